//! The agentkeys broker daemon (`agentkeysd`).
//!
//! - [`startup`]: the hardening sequence run before anything else.
#![forbid(unsafe_code)]

pub mod startup;
