//! Tunables shared by the client and the server. Defaults are Istio ztunnel's.

use std::time::Duration;

/// HTTP/2 and connection-management settings.
///
/// `Config::default()` reproduces Istio's ztunnel: 4 MiB stream window, 16 MiB connection window,
/// 1 MiB frames, 100 streams per pooled client connection, `SETTINGS_MAX_CONCURRENT_STREAMS` 200
/// on the server, a PING every 10 s answered within 20 s, idle pooled connections released after
/// 5 minutes.
#[derive(Clone, Debug)]
pub struct Config {
    /// Initial HTTP/2 stream flow-control window we advertise (`SETTINGS_INITIAL_WINDOW_SIZE`).
    pub stream_window: u32,
    /// Connection flow-control window we advertise (via WINDOW_UPDATE on stream 0).
    pub connection_window: u32,
    /// Largest DATA frame payload we accept (`SETTINGS_MAX_FRAME_SIZE`).
    pub max_frame_size: u32,
    /// How many bytes one stream may queue inside h2 before writes wait for the socket.
    /// ztunnel aligns it with the stream window so a whole window can be flushed in one go.
    pub max_send_buffer: usize,
    /// Largest header block we accept (`SETTINGS_MAX_HEADER_LIST_SIZE`): CONNECT headers are few.
    pub max_header_list_size: u32,
    /// Client: concurrent streams on one pooled connection before another one is opened.
    pub max_streams_per_connection: usize,
    /// Server: `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_concurrent_streams: u32,
    /// Client: a pooled connection with no stream for this long is closed.
    pub idle_timeout: Duration,
    /// Send a PING this often on every connection; `None` disables keepalive.
    pub ping_interval: Option<Duration>,
    /// A PING not answered within this is a dead connection: it is dropped.
    pub ping_timeout: Duration,
    /// Client: bound on TCP connect + TLS handshake + HTTP/2 preface for a new connection.
    pub connect_timeout: Duration,
    /// Server: bound on the TLS handshake and HTTP/2 preface of an accepted socket.
    pub handshake_timeout: Duration,
    /// Server: after a shutdown signal, how long in-flight streams may run before the remaining
    /// connections are dropped.
    pub drain_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        const MIB: u32 = 1024 * 1024;
        Config {
            stream_window: 4 * MIB,
            connection_window: 16 * MIB,
            max_frame_size: MIB,
            max_send_buffer: 4 * MIB as usize,
            max_header_list_size: 64 * 1024,
            max_streams_per_connection: 100,
            max_concurrent_streams: 200,
            idle_timeout: Duration::from_secs(5 * 60),
            ping_interval: Some(Duration::from_secs(10)),
            ping_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// HTTP/2's legal ranges (RFC 9113 §6.5.2); h2 panics outside them, so values are clamped.
const MAX_WINDOW: u32 = (1 << 31) - 1;
const MIN_FRAME: u32 = 16_384;
const MAX_FRAME: u32 = (1 << 24) - 1;

impl Config {
    fn stream_window(&self) -> u32 {
        self.stream_window.min(MAX_WINDOW)
    }

    fn connection_window(&self) -> u32 {
        self.connection_window.min(MAX_WINDOW)
    }

    fn frame_size(&self) -> u32 {
        self.max_frame_size.clamp(MIN_FRAME, MAX_FRAME)
    }

    fn send_buffer(&self) -> usize {
        self.max_send_buffer.min(u32::MAX as usize)
    }

    pub(crate) fn client_builder(&self) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(self.stream_window())
            .initial_connection_window_size(self.connection_window())
            .max_frame_size(self.frame_size())
            .max_send_buffer_size(self.send_buffer())
            .max_header_list_size(self.max_header_list_size)
            .initial_max_send_streams(self.max_streams_per_connection)
            .enable_push(false)
            // Peers such as ztunnel start each stream with 1 KiB copy buffers and so send many
            // small DATA frames; flow control already bounds what they can make us buffer.
            .data_frame_budget(usize::MAX);
        b
    }

    pub(crate) fn server_builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.stream_window())
            .initial_connection_window_size(self.connection_window())
            .max_frame_size(self.frame_size())
            .max_send_buffer_size(self.send_buffer())
            .max_header_list_size(self.max_header_list_size)
            .max_concurrent_streams(self.max_concurrent_streams)
            .data_frame_budget(usize::MAX);
        b
    }
}
