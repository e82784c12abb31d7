//! Plenum: a Server-Sent Events server for very many subscribers.
//!
//! The library holds everything; `main.rs` only dispatches. See the README's
//! architecture section for how the pieces fit.

pub mod backend;
pub mod check;
pub mod cli;
pub mod config;
pub mod conn;
pub mod http;
pub mod hub;
pub mod load;
pub mod metrics;
pub mod net;
pub mod server;
pub mod shard;
