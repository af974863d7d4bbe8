//! stoker-controller (placeholder)
