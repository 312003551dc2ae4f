//! `init_tracing` installs a global subscriber once (own test binary: it is process-global).

use telemetry::{LogFormat, TelemetryError, init_tracing};

#[test]
fn init_tracing_validates_and_installs_once() {
    assert!(matches!(
        init_tracing(LogFormat::Json, "info,dns=notalevel"),
        Err(TelemetryError::Filter { .. })
    ));
    init_tracing(LogFormat::Json, "info,hickory_server=warn").expect("first init");
    assert!(tracing::enabled!(tracing::Level::INFO));
    assert!(!tracing::enabled!(tracing::Level::DEBUG));
    assert!(matches!(
        init_tracing(LogFormat::Plain, "debug"),
        Err(TelemetryError::AlreadyInitialized(_))
    ));
    assert_eq!("JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
    assert_eq!("plain".parse::<LogFormat>(), Ok(LogFormat::Plain));
    assert!("xml".parse::<LogFormat>().is_err());
}
