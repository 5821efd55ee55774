//! The agentkeys broker daemon library (`agentkeysd`).
#![forbid(unsafe_code)]
