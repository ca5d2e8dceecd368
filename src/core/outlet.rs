//! The one outlet between pipeline stages: `pipeline.when_full` decides whether a stage waits
//! for the next one's bounded channel or drops the newest item and counts it. Used by the
//! broker's hand-off (guard -> rules) and the rules stage (rules -> queue writer). Layer: core.
//!
//! Invariant: an item is either in the channel, or counted as dropped
//! (`edgegate_events_dropped_total{reason="channel_full"}`, logged rate-limited) and handed
//! back to the caller (which still settles its ticket in order), or handed back because the
//! next stage stopped (the caller decides what that is: the process is stopping).

use std::fmt::Display;

use super::metrics::{DropReason, Metrics};

/// What a stage does when the bounded channel to the next stage is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait: backpressure towards the sensor (its PUBACK, or the guard not reading its socket).
    Block,
    /// Drop the new item and count it.
    DropNewest,
}

/// What became of an offered item.
#[derive(Debug)]
pub enum Offered<T> {
    Sent,
    /// The channel was full under `DropNewest`: dropped and already counted; the item back.
    Dropped(T),
    /// The next stage has stopped; the item back, not counted.
    Closed(T),
}

/// Offer `item` to the next stage as `when_full` says. `next` names the busy stage and
/// `topic` the item's topic for the log line of a drop.
pub async fn offer<T>(
    tx: &flume::Sender<T>,
    when_full: WhenFull,
    item: T,
    metrics: &Metrics,
    next: &str,
    topic: fn(&T) -> &str,
) -> Offered<T> {
    match when_full {
        WhenFull::Block => match tx.send_async(item).await {
            Ok(()) => Offered::Sent,
            Err(flume::SendError(item)) => Offered::Closed(item),
        },
        WhenFull::DropNewest => match tx.try_send(item) {
            Ok(()) => Offered::Sent,
            Err(flume::TrySendError::Full(item)) => {
                let topic: &dyn Display = &topic(&item);
                metrics.drop_events(
                    DropReason::ChannelFull,
                    1,
                    &format_args!("{next} busy; dropped {topic}"),
                );
                Offered::Dropped(item)
            }
            Err(flume::TrySendError::Disconnected(item)) => Offered::Closed(item),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &String) -> &str {
        s
    }

    fn dropped(m: &Metrics) -> String {
        m.render()
            .lines()
            .filter(|l| l.starts_with("edgegate_events_dropped_total{reason=\"channel_full\"}"))
            .collect()
    }

    #[tokio::test]
    async fn drop_newest_counts_and_hands_back() {
        let m = Metrics::new();
        let (tx, rx) = flume::bounded(1);
        let o = offer(&tx, WhenFull::DropNewest, "a".to_string(), &m, "x", name).await;
        assert!(matches!(o, Offered::Sent));
        let o = offer(&tx, WhenFull::DropNewest, "b".to_string(), &m, "x", name).await;
        assert!(matches!(o, Offered::Dropped(ref s) if s == "b"));
        assert!(dropped(&m).ends_with(" 1"), "{}", dropped(&m));
        drop(rx);
        let o = offer(&tx, WhenFull::DropNewest, "c".to_string(), &m, "x", name).await;
        assert!(matches!(o, Offered::Closed(ref s) if s == "c"));
        assert!(
            dropped(&m).ends_with(" 1"),
            "a stopped stage is no channel_full drop"
        );
    }

    #[tokio::test]
    async fn block_waits_for_room() {
        let m = Metrics::new();
        let (tx, rx) = flume::bounded(1);
        tx.send("a".to_string()).unwrap();
        let waiting = offer(&tx, WhenFull::Block, "b".to_string(), &m, "x", name);
        let recv = async {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            rx.recv_async().await.unwrap()
        };
        let (o, first) = tokio::join!(waiting, recv);
        assert!(matches!(o, Offered::Sent));
        assert_eq!(first, "a");
        assert_eq!(rx.recv().unwrap(), "b");
        assert!(dropped(&m).is_empty() || dropped(&m).ends_with(" 0"));
    }
}
