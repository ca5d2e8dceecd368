//! Reference cloud consumer for the cloud team: subscribes to the streams edgegate forwards,
//! drops duplicates by event `id`, and reports lost events by gaps in `sequence`.
//!
//!     cargo run --example cloud_consumer -- [HOST] [PORT] [FILTER]
//!     cargo run --example cloud_consumer -- 127.0.0.1 1883 'edge/#'
//!
//! Prints each new event (one line), a note for each duplicate it dropped, and totals every
//! 10 s. Subscribe with QoS 1 so the cloud broker does not drop what the gateway delivered.

use std::time::{Duration, Instant};

use edgegate::commands::consumer::{envelope_keys, envelopes, Tracker, Verdict};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let host = args.next().unwrap_or_else(|| "127.0.0.1".into());
    let port: u16 = args.next().map(|p| p.parse()).transpose()?.unwrap_or(1883);
    let filter = args.next().unwrap_or_else(|| "edge/#".into());

    let mut opts = MqttOptions::new(
        format!("edgegate-consumer-{}", std::process::id()),
        host,
        port,
    );
    opts.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    client.subscribe(&filter, QoS::AtLeastOnce).await?;

    let mut tracker = Tracker::new();
    let mut last_report = Instant::now();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // One CloudEvent, or a batch of them (upstream.batch_events > 1).
                let Ok(batch) = envelopes(&p.payload) else {
                    eprintln!("not a CloudEvents envelope or batch on {}", p.topic);
                    continue;
                };
                for env in batch {
                    let Some((source, id, seq)) = envelope_keys(&env) else {
                        eprintln!("envelope without source/id/sequence on {}", p.topic);
                        continue;
                    };
                    match tracker.observe(source, id, seq) {
                        Verdict::New => println!(
                            "{} {} seq={} {}",
                            env["type"],
                            env["subject"],
                            seq,
                            env.get("data").unwrap_or(&env["data_base64"])
                        ),
                        Verdict::Duplicate => println!("(duplicate dropped: id {id}, seq {seq})"),
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => eprintln!("subscribed to {filter}"),
            Ok(_) => {}
            Err(e) => {
                eprintln!("connection: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            let t = tracker.totals();
            eprintln!(
                "totals: {} unique, {} duplicates dropped, {} sequence numbers missing",
                t.unique, t.duplicates, t.missing
            );
            for (source, upto) in tracker.progress() {
                let gaps = tracker.gaps(&source);
                if !gaps.is_empty() {
                    eprintln!(
                        "  {source}: complete up to {upto}; missing {:?}{}",
                        &gaps[..gaps.len().min(20)],
                        if gaps.len() > 20 { " ..." } else { "" }
                    );
                }
            }
            last_report = Instant::now();
        }
    }
}
