//! stoker-crds (placeholder)
