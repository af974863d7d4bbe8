//! Compiles and tests `agent/src/warm_gate.rs` (the agent's side of the warm
//! gate) with this crate's dependencies, until the agent crate wires it in
//! and runs these tests itself.

#[path = "../../agent/src/warm_gate.rs"]
#[allow(dead_code)]
mod warm_gate;
