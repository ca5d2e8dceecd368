//! edgegate: an edge event gateway.
//!
//! Sensors publish to the embedded MQTT [`broker`]; every reading is decoded
//! ([`core::decode`]) and run through the [`rules`]; events bound upstream are committed to the
//! durable [`queue`] and delivered at-least-once by the [`forwarder`]. The [`app`] wires the
//! stages into a running gateway ([`app::gateway`]); the [`commands`] are what `main` runs.
//!
//! The modules form one-way layers; each imports only from the layers below it (checked by
//! the test in `src/layers.rs`; ARCHITECTURE.md, "Layers"):
//!
//! ```text
//! commands   cli, backtest, demo, consumer, fleet CLI
//! app        gateway, supervisor, reload, HTTP, status page, logging, systemd, fleet
//! stages     broker, rules, queue, forwarder   (rules -> queue and forwarder -> queue only)
//! config     raw TOML -> validated Config (rules, ACLs, passwords, TLS)
//! core       event model, payload decoding, ack tickets, topic matching, reserved names,
//!            metrics and drop reasons, the when_full outlet, the token bucket
//! ```

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
