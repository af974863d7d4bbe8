//! stoker-testkit (placeholder)
