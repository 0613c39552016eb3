//! Parvis desktop console (Windows and Linux).
//!
//! The egui application arrives with issue 5. This crate depends on `proto` and portable
//! crates only, so that it keeps building for Windows.

pub use proto::API_VERSION;
