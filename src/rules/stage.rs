//! The rules stage task: readings in, actions out (to the queue).
//!
//! Invariant: every reading leaves this stage as at least one queued event, or as a counted
//! drop (`unrouted`, `rule_drop`, `channel_full`).

use std::sync::Arc;

use crate::config::WhenFull;
use crate::event::Reading;
use crate::ops::metrics::{DropReason, Metrics};
use crate::queue::{QueueHandle, TryAppend};

use super::{Action, Disposition, Engine};

pub struct RulesStage {
    pub engine: Engine,
    pub input: flume::Receiver<Reading>,
    pub queue: QueueHandle,
    pub when_full: WhenFull,
    pub metrics: Arc<Metrics>,
}

impl RulesStage {
    /// Runs until the ingest side closes the channel and everything received is handed on.
    pub async fn run(mut self) {
        let mut actions = Vec::new();
        while let Ok(reading) = self.input.recv_async().await {
            match self.engine.process(&reading, &mut actions) {
                Disposition::Forwarded => {}
                Disposition::DroppedByRule(i) => {
                    let rule = self.engine.rule_name(i);
                    self.metrics.drop_events(
                        DropReason::RuleDrop,
                        1,
                        &format_args!("rule {rule:?} dropped {}", reading.topic),
                    );
                }
                Disposition::Unrouted => {
                    self.metrics.drop_events(
                        DropReason::Unrouted,
                        1,
                        &format_args!("no rule forwards {}", reading.topic),
                    );
                }
            }
            for action in actions.drain(..) {
                match action {
                    Action::Forward(event) => match self.when_full {
                        WhenFull::Block => {
                            if self.queue.append(event).await.is_err() {
                                self.metrics.drop_events(
                                    DropReason::Shutdown,
                                    1,
                                    &"queue writer stopped",
                                );
                            }
                        }
                        WhenFull::DropNewest => match self.queue.try_append(event) {
                            TryAppend::Sent => {}
                            TryAppend::Full(e) => self.metrics.drop_events(
                                DropReason::ChannelFull,
                                1,
                                &format_args!("queue writer busy; dropped event for {}", e.subject),
                            ),
                            TryAppend::Closed => self.metrics.drop_events(
                                DropReason::Shutdown,
                                1,
                                &"queue writer stopped",
                            ),
                        },
                    },
                }
            }
        }
    }
}
