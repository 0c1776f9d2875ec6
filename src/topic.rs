//! MQTT topic names and filters: validation and matching (MQTT 3.1.1 section 4.7), and the
//! placeholders of topic templates.
//!
//! Pure functions and plain values, no state. `matches` follows the spec, including that a
//! filter starting with a wildcard does not match topics starting with `$`.
//!
//! Topic templates carry placeholders, filled in two steps:
//! - once, when the configuration is loaded: the plant namespace's ISA-95 levels
//!   `{enterprise}`, `{site}`, `{area}`, `{line}` ([`Namespace::fill`], the one place for
//!   them), so that the templates a component is built from carry only the next kind;
//! - by each component: `{gateway_id}` ([`with_gateway_id`], the one place for it), and the
//!   component's own `{device}` and `{tag}`.

/// Fills `{gateway_id}` into a topic template (other placeholders are left alone).
pub fn with_gateway_id(template: &str, gateway_id: &str) -> String {
    template.replace("{gateway_id}", gateway_id)
}

/// The default first level of the sources' default topics (`field/{device}/{tag}`), used when
/// `[gateway.namespace]` gives no other root.
pub const DEFAULT_ROOT: &str = "field";

/// The root of the sources' default topics when every ISA-95 level is set and
/// `gateway.namespace.topic_root` is not.
pub const ISA95_ROOT: &str = "{enterprise}/{site}/{area}/{line}";

/// The namespace placeholders [`Namespace::fill`] replaces, in ISA-95 order.
pub const LEVELS: [&str; 4] = ["enterprise", "site", "area", "line"];

/// The plant's ISA-95 levels that topic templates may name. `None`: not set. Values are
/// checked with [`validate_level`] before they are filled in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespace {
    /// `{enterprise}`.
    pub enterprise: Option<String>,
    /// `{site}`.
    pub site: Option<String>,
    /// `{area}`.
    pub area: Option<String>,
    /// `{line}`.
    pub line: Option<String>,
}

/// Why a template could not be filled. The caller names the key and says the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FillError {
    /// `{name}` is not a placeholder this template may use: remove it or spell a known one.
    #[error("unknown placeholder {{{0}}}")]
    Unknown(String),
    /// A level is used but not set: set the level, or remove it from the template.
    #[error("{{{0}}} is used but {0} is not set")]
    Unset(&'static str),
    /// A `{` without its `}`: close it or remove it.
    #[error("a '{{' without its '}}'")]
    Unclosed,
}

impl Namespace {
    /// This namespace with a device's own `area` and `line` in place of these, where it sets
    /// them (one gateway often serves several lines).
    pub fn for_device(&self, area: Option<&str>, line: Option<&str>) -> Namespace {
        Namespace {
            area: area.map(str::to_string).or_else(|| self.area.clone()),
            line: line.map(str::to_string).or_else(|| self.line.clone()),
            ..self.clone()
        }
    }

    /// The value of the level `name` (one of [`LEVELS`]), if set.
    pub fn level(&self, name: &str) -> Option<&str> {
        match name {
            "enterprise" => self.enterprise.as_deref(),
            "site" => self.site.as_deref(),
            "area" => self.area.as_deref(),
            "line" => self.line.as_deref(),
            _ => None,
        }
    }

    /// True when all four levels are set.
    pub fn is_complete(&self) -> bool {
        LEVELS.iter().all(|l| self.level(l).is_some())
    }

    /// True when no level is set.
    pub fn is_empty(&self) -> bool {
        LEVELS.iter().all(|l| self.level(l).is_none())
    }

    /// Fills the levels into `template`. Placeholders named in `keep` (`gateway_id`,
    /// `device`, `tag`: filled later, by whoever publishes) stay as they are; any other
    /// `{name}` is [`FillError::Unknown`], a level that is not set [`FillError::Unset`].
    /// The first error found is returned.
    pub fn fill(&self, template: &str, keep: &[&str]) -> Result<String, FillError> {
        let mut out = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or(FillError::Unclosed)?;
            let name = &after[..close];
            if keep.contains(&name) {
                out.push('{');
                out.push_str(name);
                out.push('}');
            } else if let Some(level) = LEVELS.iter().find(|l| **l == name) {
                out.push_str(self.level(level).ok_or(FillError::Unset(level))?);
            } else {
                return Err(FillError::Unknown(name.to_string()));
            }
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// One topic template of a source device, as the namespace step of loading sees it: the
/// template is rewritten in place (to `<root>/<default_tail>` when the device did not set
/// it, else with its levels filled in).
#[derive(Debug)]
pub struct DeviceTemplate<'a> {
    /// Its key under the device, e.g. `status_topic`.
    pub key: &'static str,
    /// The template.
    pub template: &'a mut String,
    /// What follows the root in the default template, e.g. `{device}/status`.
    pub default_tail: &'static str,
    /// The placeholders the source fills itself, later ([`Namespace::fill`]'s `keep`).
    pub keep: &'static [&'static str],
}

/// Checks the value of one ISA-95 level: one non-empty topic level of at most 64 characters,
/// without `/`, `+`, `#`, braces (it would read as a placeholder) or NUL.
pub fn validate_level(level: &str) -> Result<(), &'static str> {
    if level.is_empty() {
        return Err("empty; give the level a name or remove the key");
    }
    if level.len() > 64 {
        return Err("longer than 64 bytes; use a shorter name");
    }
    if level.contains(['/', '+', '#', '{', '}', '\0']) {
        return Err("one topic level: no '/', '+', '#', '{' or '}'; e.g. \"line3\"");
    }
    Ok(())
}

/// Checks a topic name (what a PUBLISH carries): non-empty, no wildcards, no NUL.
pub fn validate_topic(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("empty topic; topics need at least one character");
    }
    if topic.len() > 65535 {
        return Err("longer than 65535 bytes");
    }
    if topic.contains(['+', '#']) {
        return Err("a topic name must not contain '+' or '#'");
    }
    if topic.contains('\0') {
        return Err("contains a NUL character");
    }
    Ok(())
}

/// How a shared subscription's filter starts: `$share/<group>/<filter>`.
pub const SHARE_PREFIX: &str = "$share/";

/// The filter a subscription matches topics with: `<filter>` of `$share/<group>/<filter>`
/// (a group without wildcards, not empty), else the filter itself. A malformed shared
/// filter comes back whole (and so fails [`validate_filter`] or matches nothing a device can
/// publish: no topic starts with `$`).
pub fn inner_filter(filter: &str) -> &str {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        return filter;
    };
    match rest.split_once('/') {
        Some((group, inner))
            if !group.is_empty() && !group.contains(['+', '#']) && !inner.is_empty() =>
        {
            inner
        }
        _ => filter,
    }
}

/// Checks a topic filter: `#` only as the whole last level, `+` only as a whole level.
pub fn validate_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("empty filter; use \"#\" for everything");
    }
    if filter.contains('\0') {
        return Err("contains a NUL character");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err("'#' must be a whole level and the last one, as in \"a/b/#\"");
        }
        if level.contains('+') && *level != "+" {
            return Err("'+' must be a whole level, as in \"a/+/c\"");
        }
    }
    Ok(())
}

/// True when `topic` matches `filter`.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A set of filters, matched in order.
#[derive(Debug, Clone, Default)]
pub struct FilterSet {
    filters: Vec<String>,
}

impl FilterSet {
    /// Builds a set from already validated filters.
    pub fn new(filters: impl IntoIterator<Item = String>) -> Self {
        FilterSet {
            filters: filters.into_iter().collect(),
        }
    }

    /// True when any filter matches `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        self.filters.iter().any(|f| matches(f, topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert!(validate_filter("#").is_ok());
        assert!(validate_filter("a/+/c/#").is_ok());
        assert!(validate_filter("a/#/b").is_err());
        assert!(validate_filter("a/b#").is_err());
        assert!(validate_filter("a+/b").is_err());
        assert!(validate_filter("").is_err());
    }

    #[test]
    fn topics() {
        assert!(validate_topic("a/b").is_ok());
        assert!(validate_topic("a/+").is_err());
        assert!(validate_topic("").is_err());
    }

    fn plant() -> Namespace {
        Namespace {
            enterprise: Some("acme".into()),
            site: Some("plant1".into()),
            area: Some("packaging".into()),
            line: Some("line3".into()),
        }
    }

    #[test]
    fn namespace_fills_levels_and_keeps_the_later_placeholders() {
        let ns = plant();
        let keep = ["gateway_id", "device", "tag"];
        assert_eq!(
            ns.fill("{enterprise}/{site}/{area}/{line}/{device}/{tag}", &keep)
                .unwrap(),
            "acme/plant1/packaging/line3/{device}/{tag}"
        );
        assert_eq!(
            ns.fill("field/{gateway_id}/{device}", &keep).unwrap(),
            "field/{gateway_id}/{device}"
        );
        assert_eq!(ns.fill("no/placeholders", &[]).unwrap(), "no/placeholders");
        // A device's own area and line win; unset ones fall back to the gateway's.
        let d = ns.for_device(None, Some("line4"));
        assert_eq!(
            d.fill(ISA95_ROOT, &[]).unwrap(),
            "acme/plant1/packaging/line4"
        );
        assert!(ns.is_complete() && !ns.is_empty());
    }

    #[test]
    fn namespace_refuses_unknown_unset_and_unclosed() {
        let mut ns = plant();
        assert_eq!(
            ns.fill("{plant}/{device}", &["device"]),
            Err(FillError::Unknown("plant".into()))
        );
        assert_eq!(
            ns.fill("{tag}", &["device"]),
            Err(FillError::Unknown("tag".into()))
        );
        assert_eq!(ns.fill("a/{site", &[]), Err(FillError::Unclosed));
        ns.site = None;
        assert_eq!(
            ns.fill("{enterprise}/{site}", &[]),
            Err(FillError::Unset("site"))
        );
        assert!(!ns.is_complete());
        assert!(Namespace::default().is_empty());
    }

    #[test]
    fn levels() {
        assert!(validate_level("line3").is_ok());
        assert!(validate_level("Line 3 (north)").is_ok());
        for bad in ["", "a/b", "a+", "#", "{x}", &"x".repeat(65)] {
            assert!(validate_level(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn matching() {
        assert!(matches("#", "a/b"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/d"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("+/+", "/x"));
    }
}
