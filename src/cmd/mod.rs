//! What only the binary needs: its flags and config file, the replay
//! command's front end, the demo and the benchmark.

pub mod bench;
pub mod cli;
pub mod config_file;
pub mod demo;
pub mod otlp;
pub mod replay;
