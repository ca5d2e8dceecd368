//! Commands: what `main` runs for each subcommand besides `run`. Layer: the top one; a command
//! may import every layer below (app, stages, config, core) and nothing imports a command.
//!
//! - [`cli`]: `check-config`, `queue ...`, `passwd`, and the exit codes ([`cli::exit`]);
//! - [`backtest`]: `edgegate backtest` (reading files, exit codes; the replay itself is
//!   `rules::backtest`);
//! - [`demo`]: `edgegate demo`; [`consumer`]: the reference cloud consumer;
//! - [`fleet`]: `fleet push/status/keygen`.

pub mod backtest;
pub mod cli;
pub mod consumer;
pub mod demo;
pub mod fleet;
