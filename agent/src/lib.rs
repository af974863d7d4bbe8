//! stoker-agent (placeholder)
