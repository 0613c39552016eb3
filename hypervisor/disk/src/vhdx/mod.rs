//! VHDX: fixed, dynamic and differencing images, with log replay.
