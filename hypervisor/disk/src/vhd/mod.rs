//! VHD (Virtual PC / VHD1): fixed, dynamic and differencing images.
