//! Per-device serial metrics, registered in the gateway's registry as `fieldgate_serial_*`.
//!
//! Owns the metric families; each port task gets a [`DeviceMetrics`] of plain handles (atomics,
//! no locks on the hot path). Every label of a device is created when its task is built, so a
//! scrape shows zeros rather than absent series.
//!
//! Invariant: `frames_in` counts every frame the framer produced, dropped ones included, so
//! published frames = `frames_in` - sum of `frames_dropped`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::Register;

type Labels = Vec<(String, String)>;

/// Why a frame read from a port was not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameDrop {
    /// Longer than `framing.max_length`.
    TooLong,
    /// `json` decoding and the frame is not JSON.
    DecodeError,
    /// `regex` decoding and the pattern does not match.
    NoMatch,
}

impl FrameDrop {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameDrop::TooLong => "too_long",
            FrameDrop::DecodeError => "decode_error",
            FrameDrop::NoMatch => "no_match",
        }
    }
}

/// Why a message on the write topic did not reach the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteDrop {
    /// The port was not open.
    Offline,
    /// The write failed or timed out (`write_timeout`).
    Failed,
}

impl WriteDrop {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteDrop::Offline => "offline",
            WriteDrop::Failed => "failed",
        }
    }
}

/// The serial metric families.
#[derive(Debug, Default)]
pub struct SerialMetrics {
    frames_in: Family<Labels, Counter>,
    bytes_in: Family<Labels, Counter>,
    frames_dropped: Family<Labels, Counter>,
    writes: Family<Labels, Counter>,
    writes_dropped: Family<Labels, Counter>,
    port_errors: Family<Labels, Counter>,
    reconnects: Family<Labels, Counter>,
    online: Family<Labels, Gauge>,
}

/// One device's metric handles.
#[derive(Debug, Clone)]
pub struct DeviceMetrics {
    /// Frames cut from the byte stream (dropped ones included).
    pub frames_in: Counter,
    /// Bytes read from the port.
    pub bytes_in: Counter,
    too_long: Counter,
    decode_error: Counter,
    no_match: Counter,
    /// Writes that reached the port whole.
    pub writes: Counter,
    write_offline: Counter,
    write_failed: Counter,
    /// Failed opens, and read/write errors or lost paths (vanished, replaced) that closed the port.
    pub port_errors: Counter,
    /// Times the port was opened again after it had been lost.
    pub reconnects: Counter,
    /// 1 while the port is open.
    pub online: Gauge,
}

impl DeviceMetrics {
    /// Counts one dropped frame.
    pub fn drop_frame(&self, why: FrameDrop) {
        match why {
            FrameDrop::TooLong => &self.too_long,
            FrameDrop::DecodeError => &self.decode_error,
            FrameDrop::NoMatch => &self.no_match,
        }
        .inc();
    }

    /// Counts one dropped write.
    pub fn drop_write(&self, why: WriteDrop) {
        match why {
            WriteDrop::Offline => &self.write_offline,
            WriteDrop::Failed => &self.write_failed,
        }
        .inc();
    }
}

impl Register for SerialMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "serial_frames_in",
            "Frames cut from a serial port's byte stream, dropped ones included",
            self.frames_in.clone(),
        );
        r.register(
            "serial_bytes_in",
            "Bytes read from a serial port",
            self.bytes_in.clone(),
        );
        r.register(
            "serial_frames_dropped",
            "Serial frames not published, by reason (too_long, decode_error, no_match)",
            self.frames_dropped.clone(),
        );
        r.register(
            "serial_writes",
            "Messages from the write topic written to a serial port",
            self.writes.clone(),
        );
        r.register(
            "serial_writes_dropped",
            "Messages from the write topic not written, by reason (offline, failed)",
            self.writes_dropped.clone(),
        );
        r.register(
            "serial_port_errors",
            "Failed opens, and read/write errors or lost paths that closed a serial port",
            self.port_errors.clone(),
        );
        r.register(
            "serial_reconnects",
            "Serial ports opened again after they were lost",
            self.reconnects.clone(),
        );
        r.register(
            "serial_online",
            "1 while the serial port is open",
            self.online.clone(),
        );
    }
}

impl SerialMetrics {
    /// The handles for device `name`, every series created at zero.
    pub fn device(&self, name: &str) -> DeviceMetrics {
        let dev = || vec![("device".to_string(), name.to_string())];
        let with = |k: &str, v: &str| {
            let mut l = dev();
            l.push((k.to_string(), v.to_string()));
            l
        };
        let dropped = |w: FrameDrop| {
            self.frames_dropped
                .get_or_create(&with("reason", w.as_str()))
                .clone()
        };
        let wdropped = |w: WriteDrop| {
            self.writes_dropped
                .get_or_create(&with("reason", w.as_str()))
                .clone()
        };
        DeviceMetrics {
            frames_in: self.frames_in.get_or_create(&dev()).clone(),
            bytes_in: self.bytes_in.get_or_create(&dev()).clone(),
            too_long: dropped(FrameDrop::TooLong),
            decode_error: dropped(FrameDrop::DecodeError),
            no_match: dropped(FrameDrop::NoMatch),
            writes: self.writes.get_or_create(&dev()).clone(),
            write_offline: wdropped(WriteDrop::Offline),
            write_failed: wdropped(WriteDrop::Failed),
            port_errors: self.port_errors.get_or_create(&dev()).clone(),
            reconnects: self.reconnects.get_or_create(&dev()).clone(),
            online: self.online.get_or_create(&dev()).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_series_exist_at_zero_and_count() {
        let m = SerialMetrics::default();
        let mut r = Registry::with_prefix("fieldgate");
        m.register(&mut r);
        let d = m.device("scale");
        d.drop_frame(FrameDrop::NoMatch);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        for want in [
            "fieldgate_serial_frames_dropped_total{device=\"scale\",reason=\"no_match\"} 1",
            "fieldgate_serial_frames_dropped_total{device=\"scale\",reason=\"too_long\"} 0",
            "fieldgate_serial_writes_dropped_total{device=\"scale\",reason=\"offline\"} 0",
            "fieldgate_serial_online{device=\"scale\"} 0",
        ] {
            assert!(out.contains(want), "{want} not in\n{out}");
        }
    }
}
