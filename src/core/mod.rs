//! Core: the vocabulary every layer above shares. Layer: the bottom one; a module here imports
//! only other modules of `core` (and crates), never config, a stage, the app or a command.
//!
//! - [`event`]: readings, events and their CloudEvents envelope; [`decode`]: what a sensor's
//!   payload is (never fails, never drops);
//! - [`ack`]: acknowledgement tickets (a sensor's PUBACK means committed);
//! - [`topic`]: MQTT topic filters (validation, matching, one filter covering another);
//!   [`reserved`]: the gateway's own topics;
//! - [`metrics`]: the metric registry and the drop reasons every stage counts by;
//! - [`outlet`]: the one `pipeline.when_full` send-or-drop between stages;
//! - [`bucket`]: the one token bucket (rate limits of the guard and the forwarder);
//! - [`budget`]: byte budgets that bound what clients can make the gateway hold in memory;
//! - [`stamp`]: the publish QoS and origin every message in the embedded broker carries.

pub mod ack;
pub mod bucket;
pub mod budget;
pub mod decode;
pub mod event;
pub mod metrics;
pub mod outlet;
pub mod reserved;
pub mod stamp;
pub mod topic;
