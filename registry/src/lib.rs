//! stoker-registry (placeholder)
