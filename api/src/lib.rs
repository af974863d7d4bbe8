//! stoker-api (placeholder)
