//! What only the binary needs: its flags and config file, the demo and the
//! benchmark.

pub mod bench;
pub mod cli;
pub mod config_file;
pub mod demo;
