//! Plenum: a Server-Sent Events server for very many subscribers.
//!
//! The library holds everything; `main.rs` only dispatches. See the README's
//! architecture section for how the pieces fit.

pub mod backend;
pub mod check;
pub mod cli;
pub mod load;
