//! Rotation: certificates are renewed at half life; live connections survive; new handshakes
//! use the new certificate.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use certs::{CertificateAuthority, IdentityManager, MIN_TTL, SpiffeId};
use common::{handshake, ping};

fn setup() -> (IdentityManager, SpiffeId, SpiffeId) {
    let ca = Arc::new(CertificateAuthority::generate("cluster.local").unwrap());
    let m = IdentityManager::new(ca.clone(), ca.trust_bundle(), MIN_TTL);
    (
        m,
        SpiffeId::new("cluster.local", "ns", "server"),
        SpiffeId::new("cluster.local", "ns", "client"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renews_at_half_life_and_keeps_live_connections() {
    let (m, server_id, client_id) = setup();
    let server = m.server_config(&server_id).unwrap();
    let client = m
        .client_config(&client_id, std::slice::from_ref(&server_id))
        .unwrap();
    let issued = Instant::now();
    let first = m.fetch(&server_id).await.unwrap();
    assert_eq!(first.id, server_id);
    // Cached: a second fetch right away is the same certificate.
    assert_eq!(m.fetch(&server_id).await.unwrap().leaf(), first.leaf());

    let (c, s) = handshake(client.clone(), server.clone()).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert_eq!(c.get_ref().1.peer_certificates().unwrap()[0], *first.leaf());
    ping(&mut c, &mut s, b"before").await;

    // Wait for the background renewal (half of 2 s).
    let rotated = loop {
        let now = m.fetch(&server_id).await.unwrap();
        if now.leaf() != first.leaf() {
            break now;
        }
        assert!(
            issued.elapsed() < Duration::from_secs(5),
            "no rotation within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let at = issued.elapsed();
    assert!(
        at >= MIN_TTL / 2 - Duration::from_millis(100),
        "rotated too early: {at:?}"
    );
    assert_eq!(rotated.id, server_id);
    assert!(rotated.not_after > first.not_after);

    // The connection made with the old certificate still carries data, even past its expiry.
    ping(&mut c, &mut s, b"after rotation").await;
    tokio::time::sleep(
        first
            .not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    ping(&mut c, &mut s, b"after expiry").await;

    // A new handshake gets a current certificate, not the first one.
    let (c2, s2) = handshake(client, server).await;
    let (c2, _s2) = (c2.expect("new handshake after rotation"), s2.unwrap());
    assert_ne!(
        c2.get_ref().1.peer_certificates().unwrap()[0],
        *first.leaf()
    );
}

#[test]
fn without_a_runtime_renews_lazily() {
    let (m, server_id, _) = setup();
    // Created outside any runtime: no background task, renewal happens on lookup.
    m.server_config(&server_id).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let first = rt.block_on(m.fetch(&server_id)).unwrap();
    assert_eq!(
        rt.block_on(m.fetch(&server_id)).unwrap().leaf(),
        first.leaf()
    );
    std::thread::sleep(MIN_TTL / 2 + Duration::from_millis(100));
    let second = rt.block_on(m.fetch(&server_id)).unwrap();
    assert_ne!(second.leaf(), first.leaf());
}

#[test]
fn renewal_survives_the_runtime_that_started_it() {
    let (m, server_id, _) = setup();
    // The background task lives on a runtime that then shuts down with the task.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let first = rt.block_on(async {
        m.server_config(&server_id).unwrap();
        m.fetch(&server_id).await.unwrap()
    });
    drop(rt);

    // Past half life plus the grace period (a tenth of the lifetime): lookups renew inline.
    std::thread::sleep(MIN_TTL / 2 + MIN_TTL / 10 + Duration::from_millis(100));
    let other = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let second = other.block_on(m.fetch(&server_id)).unwrap();
    assert_ne!(
        second.leaf(),
        first.leaf(),
        "renewal stopped with the runtime"
    );
    assert!(second.not_after > first.not_after);
}

#[test]
fn concurrent_lookups_past_half_life_mint_one_certificate() {
    let (m, server_id, _) = setup();
    // No runtime: every lookup past half life would renew inline.
    m.server_config(&server_id).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let first = rt.block_on(m.fetch(&server_id)).unwrap();
    std::thread::sleep(MIN_TTL / 2 + Duration::from_millis(100));

    const THREADS: usize = 8;
    let barrier = Arc::new(std::sync::Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (m, id, barrier) = (m.clone(), server_id.clone(), barrier.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                barrier.wait();
                rt.block_on(m.fetch(&id)).unwrap().leaf().clone()
            })
        })
        .collect();
    let mut leaves: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    leaves.push(rt.block_on(m.fetch(&server_id)).unwrap().leaf().clone());
    let mut new: Vec<&[u8]> = leaves
        .iter()
        .filter(|l| *l != first.leaf())
        .map(|l| l.as_ref())
        .collect();
    new.sort();
    new.dedup();
    // Lookups that overlapped the minting kept the old certificate; everyone else got the one
    // new certificate.
    assert_eq!(new.len(), 1, "{} certificates minted", new.len());
}
