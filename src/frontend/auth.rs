//! Who a device is, and what it may do: password checks and topic ACLs.
//!
//! Owns the account table (argon2id PHC hashes, or plain passwords kept for compatibility)
//! and the ACL rules; hashing, the hash check and the delay after a failed login are the
//! [`crate::password`] leaf's, shared with the operator page's login. Invariants:
//! - a password is checked with a constant-time comparison (argon2's verifier, or a hash of
//!   both sides for the plain-text compatibility mode), never by `==` on the secret;
//! - `%u` / `%c` are substituted only with values that are one whole topic level: an identity
//!   or client id containing `/`, `+`, `#` or NUL makes every rule that uses it match nothing,
//!   so a crafted name cannot widen its own rights;
//! - subscribe rules are checked by *coverage*: a requested filter is allowed only when every
//!   topic it could ever match is matched by one allowed pattern.

use std::collections::HashMap;

use super::config::{AclConfig, AclRules, UserConfig};
use crate::{password, topic};

#[derive(Debug, Clone)]
enum Secret {
    Hash(String),
    Plain(String),
}

/// The account table.
#[derive(Debug, Clone, Default)]
pub struct Users {
    by_name: HashMap<String, Secret>,
}

/// Outcome of a password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Known user, right password.
    Ok,
    /// No such user.
    UnknownUser,
    /// Known user, wrong password.
    WrongPassword,
}

impl Users {
    /// Builds the table from validated config.
    pub fn new(users: &[UserConfig]) -> Users {
        let by_name = users
            .iter()
            .map(|u| {
                let s = if u.password_hash.is_empty() {
                    Secret::Plain(u.password.clone())
                } else {
                    Secret::Hash(u.password_hash.clone())
                };
                (u.username.clone(), s)
            })
            .collect();
        Users { by_name }
    }

    /// Usernames whose password is stored in plain text (warned about at start).
    pub fn plain_text(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .by_name
            .iter()
            .filter(|(_, s)| matches!(s, Secret::Plain(_)))
            .map(|(n, _)| n.as_str())
            .collect();
        v.sort_unstable();
        v
    }

    /// Checks a login. Slow on purpose for hashed passwords (argon2): call it off the async
    /// workers.
    pub fn verify(&self, username: &str, password: &[u8]) -> Verdict {
        match self.by_name.get(username) {
            None => Verdict::UnknownUser,
            Some(Secret::Hash(phc)) if password::verify(phc, password) => Verdict::Ok,
            Some(Secret::Hash(_)) => Verdict::WrongPassword,
            Some(Secret::Plain(p)) => {
                if password::constant_time_eq(p.as_bytes(), password) {
                    Verdict::Ok
                } else {
                    Verdict::WrongPassword
                }
            }
        }
    }
}

/// The ACL, shared read-only by every connection.
#[derive(Debug, Clone)]
pub struct Acl {
    default: AclRules,
    users: HashMap<String, AclRules>,
    gateway_only: Vec<String>,
    device_may_publish: Vec<String>,
    commands: Vec<String>,
    command_identities: Vec<String>,
    /// Some `deny_subscribe` rule exists: deliveries need checking.
    filters_deliveries: bool,
}

/// What a client asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// PUBLISH to a topic.
    Publish,
    /// SUBSCRIBE to a filter.
    Subscribe,
    /// Receive a delivery on a topic (only `deny_subscribe` applies).
    Deliver,
}

impl Action {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::Deliver => "deliver",
        }
    }
}

impl Acl {
    /// Builds the ACL from validated config.
    pub fn new(cfg: &AclConfig) -> Acl {
        Acl {
            default: cfg.default.clone(),
            users: cfg
                .users
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            gateway_only: cfg.internal.gateway_only.clone(),
            device_may_publish: cfg.internal.device_may_publish.clone(),
            commands: cfg.internal.commands.clone(),
            command_identities: cfg.internal.command_identities.clone(),
            filters_deliveries: std::iter::once(&cfg.default)
                .chain(cfg.users.values())
                .any(|r| !r.deny_subscribe.is_empty()),
        }
    }

    /// True when `topic` is reserved for the gateway's own components.
    pub fn gateway_only(&self, topic: &str) -> bool {
        self.gateway_only.iter().any(|f| topic::matches(f, topic))
            && !self
                .device_may_publish
                .iter()
                .any(|f| topic::matches(f, topic))
    }

    /// False when `topic` is a command topic the gateway obeys (`cmd/ota/#`) and `identity`
    /// is not one named in `ota.local_commands`: those commands come from the cloud.
    pub fn may_command(&self, identity: Option<&str>, topic: &str) -> bool {
        !self.commands.iter().any(|f| topic::matches(f, topic))
            || identity.is_some_and(|i| self.command_identities.iter().any(|c| c == i))
    }

    /// True when `identity` (None: anonymous) with `client_id` may do `action` on `target`
    /// (a topic for publish, a filter for subscribe).
    pub fn allows(
        &self,
        identity: Option<&str>,
        client_id: &str,
        action: Action,
        target: &str,
    ) -> bool {
        if action == Action::Publish
            && (self.gateway_only(target) || !self.may_command(identity, target))
        {
            return false;
        }
        let own = identity.and_then(|i| self.users.get(i));
        let rules = || std::iter::once(&self.default).chain(own);
        // Deny rules first: a publish on a denied topic, a filter that only names denied
        // topics, a delivery on a denied topic (what a wider filter would otherwise receive).
        let denied = rules()
            .flat_map(|r| match action {
                Action::Publish => r.deny_publish.iter(),
                Action::Subscribe | Action::Deliver => r.deny_subscribe.iter(),
            })
            .filter_map(|pat| substitute(pat, identity, client_id))
            .any(|pat| match action {
                Action::Publish | Action::Deliver => topic::matches(&pat, target),
                Action::Subscribe => covers(&pat, target),
            });
        if denied {
            return false;
        }
        if action == Action::Deliver {
            return true;
        }
        rules()
            .flat_map(|r| match action {
                Action::Subscribe => r.subscribe.iter(),
                _ => r.publish.iter(),
            })
            .filter_map(|pat| substitute(pat, identity, client_id))
            .any(|pat| match action {
                Action::Subscribe => covers(&pat, target),
                _ => topic::matches(&pat, target),
            })
    }

    /// Whether any `deny_subscribe` rule exists (deliveries need checking only then).
    pub fn filters_deliveries(&self) -> bool {
        self.filters_deliveries
    }
}

/// Whether `client_id` fits `broker.client_id_pattern` for `identity`: `%u` stands for the
/// identity (no match for an anonymous client), `*` for any run of characters.
pub fn client_id_fits(pattern: &str, identity: Option<&str>, client_id: &str) -> bool {
    let pattern = if pattern.contains("%u") {
        match identity {
            Some(u) if !u.is_empty() => pattern.replace("%u", u),
            _ => return false,
        }
    } else {
        pattern.to_string()
    };
    glob(pattern.as_bytes(), client_id.as_bytes())
}

/// `*`-only glob match (iterative, with backtracking to the last star).
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// `pattern` with `%u` and `%c` replaced; None when a needed value is missing or is not a
/// single safe topic level.
fn substitute(pattern: &str, identity: Option<&str>, client_id: &str) -> Option<String> {
    let safe = |v: &str| !v.is_empty() && !v.contains(['/', '+', '#', '\0']);
    let mut out = pattern.to_string();
    if out.contains("%u") {
        let u = identity.filter(|u| safe(u))?;
        out = out.replace("%u", u);
    }
    if out.contains("%c") {
        if !safe(client_id) {
            return None;
        }
        out = out.replace("%c", client_id);
    }
    Some(out)
}

/// True when every topic `filter` can match is matched by `pattern` (both valid filters).
pub fn covers(pattern: &str, filter: &str) -> bool {
    // `$` topics are only reachable through patterns that name them (MQTT 4.7.2).
    if filter.starts_with('$') && pattern.starts_with(['+', '#']) {
        return false;
    }
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(fl)) if fl != "#" => {}
            (Some(pl), Some(fl)) if pl == fl && pl != "+" && pl != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl() -> Acl {
        let mut users = std::collections::BTreeMap::new();
        users.insert(
            "admin".to_string(),
            AclRules {
                publish: vec!["#".into()],
                subscribe: vec!["#".into()],
                ..AclRules::default()
            },
        );
        Acl::new(&AclConfig {
            default: AclRules {
                publish: vec!["field/%u/#".into(), "clients/%c".into()],
                subscribe: vec!["cmd/%u/#".into()],
                ..AclRules::default()
            },
            users,
            internal: Default::default(),
        })
    }

    #[test]
    fn client_id_patterns_bind_ids_to_identities() {
        assert!(client_id_fits("%u", Some("dev1"), "dev1"));
        assert!(!client_id_fits("%u", Some("dev1"), "dev1x"));
        assert!(client_id_fits("%u-*", Some("dev1"), "dev1-"));
        assert!(client_id_fits("%u-*", Some("dev1"), "dev1-a-b"));
        assert!(!client_id_fits("%u-*", Some("dev1"), "dev2-a"));
        assert!(!client_id_fits("%u-*", None, "-a"));
        assert!(client_id_fits("plc-*-line*", None, "plc-7-line3"));
        assert!(!client_id_fits("plc-*-line*", None, "plc-7-lin"));
        assert!(client_id_fits("*", None, ""));
    }

    #[test]
    fn ota_commands_are_the_clouds_unless_an_identity_is_named() {
        let a = acl();
        for t in ["cmd/ota/upgrade", "cmd/ota/status", "cmd/ota/image/abc/0"] {
            assert!(!a.allows(Some("admin"), "c", Action::Publish, t), "{t}");
            assert!(!a.allows(None, "c", Action::Publish, t), "{t}");
        }
        // Other commands stay under the ACL.
        assert!(a.allows(Some("admin"), "c", Action::Publish, "cmd/dev1/reboot"));
        let named = Acl::new(&AclConfig {
            internal: crate::frontend::config::InternalTopics {
                command_identities: vec!["admin".into()],
                ..Default::default()
            },
            ..AclConfig::default()
        });
        assert!(named.allows(Some("admin"), "c", Action::Publish, "cmd/ota/upgrade"));
        // Named, but its ACL must still grant the topic; others stay refused.
        assert!(!named.allows(Some("scada"), "c", Action::Publish, "cmd/ota/upgrade"));
        assert!(!named.allows(None, "c", Action::Publish, "cmd/ota/upgrade"));
    }

    #[test]
    fn internal_topics_are_the_gateways_even_for_admins() {
        let a = acl();
        for t in [
            "ota/dev1/metadata",
            "ota/dev1/chunk/7",
            "ota/dev1/success",
            "ota/_gateway/rollout",
            "fieldgate-internal/x",
        ] {
            assert!(!a.allows(Some("admin"), "c", Action::Publish, t), "{t}");
        }
        assert!(a.allows(Some("admin"), "c", Action::Publish, "ota/dev1/chunk/get"));
        assert!(a.allows(Some("admin"), "c", Action::Publish, "ota/dev1/progress"));
        // Subscribing to them is a matter of the ordinary rules.
        assert!(a.allows(Some("admin"), "c", Action::Subscribe, "ota/#"));
    }

    #[test]
    fn substitution_limits_a_device_to_its_subtree() {
        let a = acl();
        assert!(a.allows(Some("dev1"), "c", Action::Publish, "field/dev1/temp"));
        assert!(!a.allows(Some("dev1"), "c", Action::Publish, "field/dev2/temp"));
        assert!(a.allows(Some("dev1"), "c9", Action::Publish, "clients/c9"));
        assert!(!a.allows(None, "c", Action::Publish, "field//x"));
        assert!(a.allows(Some("dev1"), "c", Action::Subscribe, "cmd/dev1/#"));
        assert!(a.allows(Some("dev1"), "c", Action::Subscribe, "cmd/dev1/+/x"));
        assert!(!a.allows(Some("dev1"), "c", Action::Subscribe, "cmd/+/#"));
        assert!(!a.allows(Some("dev1"), "c", Action::Subscribe, "#"));
        // A name with a wildcard or separator cannot widen its rights.
        assert!(!a.allows(Some("+"), "c", Action::Publish, "field/x/y"));
        assert!(!a.allows(Some("a/b"), "c", Action::Publish, "field/a/b/c"));
        assert!(a.allows(Some("admin"), "c", Action::Subscribe, "#"));
        assert!(a.allows(Some("admin"), "c", Action::Publish, "cmd/dev1/reboot"));
    }

    #[test]
    fn coverage() {
        assert!(covers("a/#", "a/b/+"));
        assert!(covers("a/+/c", "a/+/c"));
        assert!(!covers("a/+/c", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(covers("#", "a"));
        assert!(!covers("#", "$SYS/#"));
        assert!(covers("$SYS/#", "$SYS/x"));
        assert!(!covers("a/+", "a/b/c"));
    }

    #[test]
    fn passwords() {
        use crate::password::{check_hash, hash_password};
        let phc = hash_password("s3cret").unwrap();
        check_hash(&phc).unwrap();
        assert!(check_hash("s3cret").is_err());
        let users = Users::new(&[
            UserConfig {
                username: "h".into(),
                password_hash: phc,
                password: String::new(),
            },
            UserConfig {
                username: "p".into(),
                password_hash: String::new(),
                password: "plain".into(),
            },
        ]);
        assert_eq!(users.verify("h", b"s3cret"), Verdict::Ok);
        assert_eq!(users.verify("h", b"s3cret!"), Verdict::WrongPassword);
        assert_eq!(users.verify("p", b"plain"), Verdict::Ok);
        assert_eq!(users.verify("p", b"plai"), Verdict::WrongPassword);
        assert_eq!(users.verify("x", b"plain"), Verdict::UnknownUser);
        assert_eq!(users.plain_text(), ["p"]);
    }
}
