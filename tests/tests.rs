//! Integration tests: one binary, real parts (embedded broker on port 0, SQLite in a temp dir,
//! Mosquitto as the upstream, MQTT clients as sensors).

mod util;

mod disk;
mod durability;
mod fleet;
mod lifecycle;
mod parked;
mod pipeline;

mod conformance;
mod limits;
mod protocol;
mod rules;
mod security;
mod status;
mod topics;
mod web;
