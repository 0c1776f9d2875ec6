//! The device board: what the operator page shows of every field device (Modbus and serial),
//! written by the sources, read by `/api/v1/devices`.
//!
//! A leaf: it imports nothing from the crate. The sources register their devices once at
//! build time ([`Board::add`]) and update a device's [`Slot`] when its status changes and
//! when a tag is read: at poll or line rate, never per byte. Each slot has its own
//! `std::sync::Mutex`, taken for one small copy by the writer and by the reader; nothing is
//! awaited under it. The board never grows after start-up (one slot per configured device,
//! one entry per configured tag, plus at most [`MAX_TAGS`] named by a serial decoder).

use std::sync::{Arc, Mutex, MutexGuard};

/// The most tags a device's slot keeps (serial decoders name their fields at run time).
pub const MAX_TAGS: usize = 256;

/// Every device, in configuration order.
#[derive(Debug, Default)]
pub struct Board {
    slots: Mutex<Vec<Arc<Slot>>>,
}

/// One device's entry on the board.
#[derive(Debug)]
pub struct Slot {
    name: String,
    kind: &'static str,
    view: Mutex<DeviceView>,
}

/// What is known of one device.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeviceView {
    /// Device name (its config key).
    pub name: String,
    /// `modbus` or `serial`.
    pub kind: &'static str,
    /// `unknown` (not polled yet), `online`, `degraded` or `offline`.
    pub status: &'static str,
    /// Why it is offline or degraded.
    pub last_error: Option<String>,
    /// Poll cycles of its bus that ended after the next was due (Modbus; 0 for serial).
    pub overruns: u64,
    /// Its tags, configuration order first.
    pub tags: Vec<TagView>,
}

/// The last reading of one tag.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TagView {
    /// Tag name.
    pub name: String,
    /// Unit, empty for none.
    pub unit: String,
    /// Last value (`null` before the first or when the reading failed).
    pub value: serde_json::Value,
    /// `good`, `bad`, `offline`, `invalid`, or `none` before the first reading.
    pub quality: &'static str,
    /// When it was read, Unix ms (0: never).
    pub at_ms: u64,
}

impl Board {
    /// An empty board.
    pub fn new() -> Arc<Board> {
        Arc::new(Board::default())
    }

    /// Registers a device with its configured tags (`(name, unit)`); returns its slot.
    pub fn add(&self, kind: &'static str, name: &str, tags: &[(&str, &str)]) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            name: name.to_string(),
            kind,
            view: Mutex::new(DeviceView {
                name: name.to_string(),
                kind,
                status: "unknown",
                last_error: None,
                overruns: 0,
                tags: tags
                    .iter()
                    .map(|(n, u)| TagView {
                        name: n.to_string(),
                        unit: u.to_string(),
                        value: serde_json::Value::Null,
                        quality: "none",
                        at_ms: 0,
                    })
                    .collect(),
            }),
        });
        lock(&self.slots).push(slot.clone());
        slot
    }

    /// A copy of every device's view.
    pub fn devices(&self) -> Vec<DeviceView> {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).clone();
        slots.iter().map(|s| lock(&s.view).clone()).collect()
    }
}

impl Slot {
    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's kind.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Its status changed.
    pub fn status(&self, status: &'static str, error: Option<&str>) {
        let mut v = lock(&self.view);
        v.status = status;
        v.last_error = error.map(str::to_string);
    }

    /// The overrun count of its bus.
    pub fn overruns(&self, n: u64) {
        lock(&self.view).overruns = n;
    }

    /// Tag `index` (configuration order) was read.
    pub fn tag(&self, index: usize, value: serde_json::Value, quality: &'static str, at_ms: u64) {
        let mut v = lock(&self.view);
        if let Some(t) = v.tags.get_mut(index) {
            t.value = value;
            t.quality = quality;
            t.at_ms = at_ms;
        }
    }

    /// A tag known by name only (a serial decoder's field) was read; a new name is added
    /// while the device has fewer than [`MAX_TAGS`].
    pub fn named_tag(
        &self,
        name: &str,
        value: serde_json::Value,
        quality: &'static str,
        at_ms: u64,
    ) {
        let mut v = lock(&self.view);
        if let Some(t) = v.tags.iter_mut().find(|t| t.name == name) {
            t.value = value;
            t.quality = quality;
            t.at_ms = at_ms;
        } else if v.tags.len() < MAX_TAGS {
            v.tags.push(TagView {
                name: name.to_string(),
                unit: String::new(),
                value,
                quality,
                at_ms,
            });
        }
    }
}

/// A poisoned lock still holds a whole view: every writer assigns plain fields.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_keep_their_order_status_and_last_readings() {
        let b = Board::new();
        let boiler = b.add("modbus", "boiler", &[("temp", "°C"), ("on", "")]);
        let scale = b.add("serial", "scale", &[]);
        boiler.status("online", None);
        boiler.tag(0, serde_json::json!(71.5), "good", 10);
        boiler.tag(9, serde_json::json!(1), "good", 10); // no such tag: ignored
        boiler.overruns(2);
        scale.status("offline", Some("port closed"));
        scale.named_tag("weight", serde_json::json!(12.5), "good", 11);
        scale.named_tag("weight", serde_json::json!(12.75), "good", 12);
        let d = b.devices();
        assert_eq!(d.len(), 2);
        assert_eq!(
            (d[0].name.as_str(), d[0].status, d[0].overruns),
            ("boiler", "online", 2)
        );
        assert_eq!(d[0].tags[0].value, serde_json::json!(71.5));
        assert_eq!(d[0].tags[0].unit, "°C");
        assert_eq!(d[0].tags[1].quality, "none");
        assert_eq!(d[1].last_error.as_deref(), Some("port closed"));
        assert_eq!(d[1].tags.len(), 1);
        assert_eq!(d[1].tags[0].value, serde_json::json!(12.75));
        for i in 0..MAX_TAGS + 10 {
            scale.named_tag(&format!("f{i}"), serde_json::Value::Null, "good", 1);
        }
        assert_eq!(b.devices()[1].tags.len(), MAX_TAGS);
    }
}
