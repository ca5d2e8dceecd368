//! edgegate: an edge event gateway.
//!
//! Sensors publish to the embedded MQTT [`broker`]; every reading is [`decode`]d and run
//! through the [`rules`]; events bound upstream are committed to the durable [`queue`] and
//! delivered at-least-once by the [`forwarder`]. [`gateway`] wires the stages together;
//! [`config`] and [`ops`] (metrics, health, logging, systemd) surround them. See
//! ARCHITECTURE.md for the task and channel diagram.

pub mod app;
pub mod broker;
pub mod commands;
pub mod config;
pub mod core;
pub mod forwarder;
#[cfg(test)]
mod layers;
pub mod queue;
pub mod rules;

pub use app::gateway::{run, Gateway};
pub use config::Config;

/// Install the process-wide TLS crypto provider (ring) once; the upstream client needs it.
pub fn init_crypto() {
    let _ = rumqttc_rustls_provider();
}

fn rumqttc_rustls_provider() -> Result<(), ()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| ())
}
