//! What only the binary needs: its flags, the demo and the benchmark.

pub mod bench;
pub mod cli;
pub mod demo;
