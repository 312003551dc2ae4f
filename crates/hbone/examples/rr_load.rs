//! Request/response load for `scripts/bench-ztunnel`: a 1 KiB echo server and an open-loop
//! latency client.
//!
//! ```text
//! rr_load serve PORT                      # echo 1 KiB messages (tokio, one thread)
//! rr_load latency HOST:PORT RATE CONNS SECS   # prints "samples p50_us p99_us"
//! ```
//!
//! The client runs one OS thread per connection with blocking sockets, so its timing does not
//! depend on an async timer wheel (tokio's has 1 ms ticks, an order of magnitude above what is
//! measured). Open loop: request `i` of a connection is due at `start + i / rate_per_conn`, and
//! its latency counts from that due time, so a slow answer that delays the next requests shows
//! up in their latency too (no coordinated omission).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: usize = 1024;

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve", port] => serve(parse(port)?),
        ["latency", target, rate, conns, secs] => latency(
            parse(target)?,
            parse(rate)?,
            parse(conns)?,
            Duration::from_secs_f64(parse(secs)?),
        ),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "usage: rr_load serve PORT | rr_load latency HOST:PORT RATE CONNS SECS",
        )),
    }
}

fn parse<T: std::str::FromStr>(s: &str) -> io::Result<T> {
    s.parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("bad argument {s:?}")))
}

fn serve(port: u16) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
        loop {
            let (mut s, _) = listener.accept().await?;
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = [0u8; SIZE];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

fn latency(target: SocketAddr, rate: f64, conns: usize, secs: Duration) -> io::Result<()> {
    // Wake-ups from sleep are otherwise up to 50 µs late (the default timer slack).
    // SAFETY: only changes this process's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let per_conn = rate / conns as f64;
    let count = (per_conn * secs.as_secs_f64()) as u64;
    let interval = Duration::from_secs_f64(1.0 / per_conn);
    let start = Instant::now() + Duration::from_millis(200);
    let workers: Vec<_> = (0..conns)
        .map(|c| {
            std::thread::spawn(move || -> io::Result<Histogram<u64>> {
                let mut s = TcpStream::connect(target)?;
                s.set_nodelay(true)?;
                let mut hist = Histogram::new(3).map_err(io::Error::other)?;
                let msg = [b'x'; SIZE];
                let mut back = [0u8; SIZE];
                // Spread the connections over one interval so they do not fire together.
                let offset = interval.mul_f64(c as f64 / conns as f64);
                for i in 0..count {
                    let due = start + offset + interval.mul_f64(i as f64);
                    // Open loop without coordinated omission: a request sent late because the
                    // previous answer came late is timed from when it was due. A request whose
                    // sender slept is timed from when the sender woke: how late this VM wakes a
                    // sleeping thread (often hundreds of µs) is the load generator's delay, not
                    // the path's, and would otherwise swamp the figure being measured.
                    let sent = match due.checked_duration_since(Instant::now()) {
                        Some(wait) => {
                            std::thread::sleep(wait);
                            Instant::now()
                        }
                        None => due,
                    };
                    s.write_all(&msg)?;
                    s.read_exact(&mut back)?;
                    let _ = hist.record(sent.elapsed().as_micros() as u64);
                }
                Ok(hist)
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new(3).map_err(io::Error::other)?;
    for w in workers {
        let hist = w
            .join()
            .map_err(|_| io::Error::other("latency worker panicked"))??;
        all.add(&hist).map_err(io::Error::other)?;
    }
    println!(
        "{} {} {}",
        all.len(),
        all.value_at_quantile(0.50),
        all.value_at_quantile(0.99)
    );
    Ok(())
}
