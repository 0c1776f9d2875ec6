//! MQTT topic names and filters: validation and matching (MQTT 3.1.1 section 4.7).
//!
//! Pure functions, no state. `matches` follows the spec, including that a filter starting
//! with a wildcard does not match topics starting with `$`. [`with_gateway_id`] is the one
//! place the `{gateway_id}` placeholder of topic templates is filled in.

/// Fills `{gateway_id}` into a topic template (other placeholders are left alone).
pub fn with_gateway_id(template: &str, gateway_id: &str) -> String {
    template.replace("{gateway_id}", gateway_id)
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
