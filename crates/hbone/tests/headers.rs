//! Header and authority helpers: table-driven.

use std::net::SocketAddr;

use hbone::headers::{BAGGAGE, FORWARDED, TRACEPARENT};
use hbone::{Baggage, Forwarded, ForwardedNode, HeaderError, TraceParent, parse_authority};
use http::{HeaderMap, HeaderValue};

#[test]
fn authority_table() {
    let ok: &[(&str, &str)] = &[
        ("10.0.0.1:80", "10.0.0.1:80"),
        ("240.240.0.3:443", "240.240.0.3:443"),
        ("[fd00::1]:8080", "[fd00::1]:8080"),
        ("[::ffff:10.0.0.1]:80", "[::ffff:10.0.0.1]:80"),
        ("127.0.0.1:65535", "127.0.0.1:65535"),
    ];
    for (input, want) in ok {
        let got = parse_authority(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(got, want.parse::<SocketAddr>().unwrap(), "{input}");
    }
    let bad = [
        "",
        "10.0.0.1",          // no port
        "10.0.0.1:",         // empty port
        "10.0.0.1:0",        // port 0
        "10.0.0.1:65536",    // port out of range
        "example.com:80",    // host names are not HBONE targets
        "fd00::1:80",        // IPv6 without brackets
        "[fd00::1]",         // IPv6 without port
        "[fe80::1%2]:80",    // zone id
        "[fe80::1%eth0]:80", // zone id by name
        " 10.0.0.1:80",      // whitespace
        "10.0.0.1:80/",      // path
        "user@10.0.0.1:80",  // userinfo
        "10.0.0.256:80",     // not an IPv4 literal
        "010.0.0.1:80",      // leading zero
    ];
    for input in bad {
        assert!(
            matches!(parse_authority(input), Err(HeaderError::Authority { .. })),
            "{input:?} must be refused"
        );
    }
}

#[test]
fn forwarded_is_written_the_way_istio_does() {
    let v4 = Forwarded::new("10.0.0.1:34567".parse().unwrap())
        .with_host("httpbin.default.svc.cluster.local");
    assert_eq!(
        v4.to_header_value().unwrap(),
        r#"for="10.0.0.1:34567";host=httpbin.default.svc.cluster.local"#
    );
    let v6 = Forwarded::new("[fd00::1]:80".parse().unwrap());
    assert_eq!(v6.to_header_value().unwrap(), r#"for="[fd00::1]:80""#);
    // A host with a port is not a token: quoted.
    let quoted = Forwarded::default().with_host("example.com:8080");
    assert_eq!(
        quoted.to_header_value().unwrap(),
        r#"host="example.com:8080""#
    );
}

#[test]
fn forwarded_round_trips() {
    let cases = [
        Forwarded::new("10.0.0.1:34567".parse().unwrap()).with_host("a.b.svc.cluster.local"),
        Forwarded::new("[fd00::1]:80".parse().unwrap()),
        Forwarded::default().with_host(r#"we"ird\host"#),
        Forwarded {
            for_node: Some(ForwardedNode::Ip("10.1.2.3".parse().unwrap())),
            host: None,
        },
        Forwarded {
            for_node: Some(ForwardedNode::Ip("fd00::2".parse().unwrap())),
            host: None,
        },
        Forwarded {
            for_node: Some(ForwardedNode::Other("unknown".into())),
            host: None,
        },
    ];
    for f in cases {
        let v = f.to_header_value().unwrap();
        let back = Forwarded::parse(v.to_str().unwrap()).unwrap();
        assert_eq!(back, f, "{v:?}");
    }
}

#[test]
fn forwarded_parse_table() {
    let addr = |s: &str| Some(ForwardedNode::Addr(s.parse().unwrap()));
    let cases: &[(&str, Option<ForwardedNode>, Option<&str>)] = &[
        (
            r#"for="10.0.0.1:1234";host=svc"#,
            addr("10.0.0.1:1234"),
            Some("svc"),
        ),
        (
            r#"FOR="10.0.0.1:1234"; Host=svc"#,
            addr("10.0.0.1:1234"),
            Some("svc"),
        ),
        (
            "for=10.0.0.1",
            Some(ForwardedNode::Ip("10.0.0.1".parse().unwrap())),
            None,
        ),
        (
            r#"for="[2001:db8::1]""#,
            Some(ForwardedNode::Ip("2001:db8::1".parse().unwrap())),
            None,
        ),
        (
            r#"for="[2001:db8::1]:443""#,
            addr("[2001:db8::1]:443"),
            None,
        ),
        (
            "for=_hidden;by=10.0.0.9;proto=https",
            Some(ForwardedNode::Other("_hidden".into())),
            None,
        ),
        // Only the first element (the original client) is read.
        (
            r#"for="10.0.0.1:1", for="10.0.0.2:2""#,
            addr("10.0.0.1:1"),
            None,
        ),
        (r#"host="a\"b""#, None, Some("a\"b")),
    ];
    for (input, for_node, host) in cases {
        let f = Forwarded::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(&f.for_node, for_node, "{input}");
        assert_eq!(f.host.as_deref(), *host, "{input}");
    }
    let bad = [
        "",
        "for",
        "for=",
        r#"for="10.0.0.1"#,
        "for=10.0.0.1;for=10.0.0.2",
        "for=10.0.0.1 junk",
        "=x",
    ];
    for input in bad {
        assert!(
            matches!(Forwarded::parse(input), Err(HeaderError::Forwarded { .. })),
            "{input:?} must be refused"
        );
    }
}

#[test]
fn forwarded_from_headers() {
    let mut h = HeaderMap::new();
    assert!(Forwarded::from_headers(&h).is_none());
    h.insert(FORWARDED, HeaderValue::from_static(r#"for="10.0.0.1:5""#));
    let f = Forwarded::from_headers(&h).unwrap().unwrap();
    assert_eq!(f.client_addr(), Some("10.0.0.1:5".parse().unwrap()));
    assert_eq!(f.for_node.unwrap().ip(), Some("10.0.0.1".parse().unwrap()));
}

#[test]
fn baggage_matches_ztunnel() {
    let b = Baggage {
        cluster: Some("Kubernetes".into()),
        namespace: Some("default".into()),
        workload_kind: None,
        workload_name: Some("sleep".into()),
        service_name: Some("sleep".into()),
        service_version: Some("v1".into()),
        region: None,
        zone: None,
    };
    assert_eq!(
        b.to_header_value().unwrap(),
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v1"
    );
    let mut expected = b.clone();
    expected.workload_kind = Some("deployment".into());
    assert_eq!(
        Baggage::parse(b.to_header_value().unwrap().to_str().unwrap()),
        expected
    );
}

#[test]
fn baggage_parse_table() {
    let b = Baggage::parse(
        " k8s.namespace.name = ns1 ;prop=1, k8s.cronjob.name=nightly,service.name=,unknown=x,garbage,cloud.region=eu%2Dwest",
    );
    assert_eq!(b.namespace.as_deref(), Some("ns1"));
    assert_eq!(b.workload_kind.as_deref(), Some("cronjob"));
    assert_eq!(b.workload_name.as_deref(), Some("nightly"));
    assert_eq!(b.service_name, None, "empty values are absent");
    assert_eq!(b.region.as_deref(), Some("eu-west"), "percent-decoded");

    // Several header lines merge, as ztunnel reads them.
    let mut h = HeaderMap::new();
    h.append(BAGGAGE, HeaderValue::from_static("k8s.cluster.name=K1"));
    h.append(BAGGAGE, HeaderValue::from_static("service.version=V1"));
    let b = Baggage::from_headers(&h);
    assert_eq!(b.cluster.as_deref(), Some("K1"));
    assert_eq!(b.service_version.as_deref(), Some("V1"));

    // Values outside baggage-octet are percent-encoded and come back intact.
    let odd = Baggage {
        service_name: Some("a b,c;d%".into()),
        ..Baggage::default()
    };
    let v = odd.to_header_value().unwrap();
    assert_eq!(v, "service.name=a%20b%2Cc%3Bd%25");
    assert_eq!(
        Baggage::parse(v.to_str().unwrap()).service_name,
        odd.service_name
    );
}

#[test]
fn traceparent_table() {
    let t = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    assert_eq!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
    assert_eq!(t.span_id, 0x00f067aa0ba902b7);
    assert_eq!(t.flags, 1);
    assert_eq!(
        t.to_string(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    // A future version may append fields.
    assert!(
        TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_ok()
    );
    let bad = [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ];
    for input in bad {
        assert!(
            matches!(
                TraceParent::parse(input),
                Err(HeaderError::TraceParent { .. })
            ),
            "{input:?} must be refused"
        );
    }
}

#[test]
fn traceparent_random_is_valid_and_fresh() {
    let a = TraceParent::random();
    let b = TraceParent::random();
    assert_ne!(a.trace_id, b.trace_id);
    assert_eq!(a.flags, 0, "ztunnel sends flags 00");
    let v = a.to_header_value();
    let s = v.to_str().unwrap();
    assert_eq!(s.len(), 55);
    assert_eq!(TraceParent::parse(s).unwrap(), a);
    let child = a.child();
    assert_eq!(child.trace_id, a.trace_id);
    assert_ne!(child.span_id, a.span_id);
    let mut h = HeaderMap::new();
    h.insert(TRACEPARENT, v);
    assert_eq!(TraceParent::from_headers(&h).unwrap().unwrap(), a);
}
