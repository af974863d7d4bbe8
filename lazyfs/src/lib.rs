//! stoker-lazyfs (placeholder)
