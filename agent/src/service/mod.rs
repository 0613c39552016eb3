//! gRPC handlers: each checks and converts its arguments, calls the agent, and converts
//! the result. Errors become statuses in one place (`crate::error`).

pub mod console;
pub mod disk;
pub mod host;
pub mod switch;
pub mod upload;
pub mod vm;
