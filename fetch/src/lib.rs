//! stoker-fetch (placeholder)
