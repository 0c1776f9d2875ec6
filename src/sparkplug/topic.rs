//! Sparkplug topic names (spec 4.1): `spBv1.0/<group>/<type>/<edge node>[/<device>]`, and
//! the primary host's `spBv1.0/STATE/<host id>`. Pure.

/// The namespace element of every Sparkplug B topic.
pub const NAMESPACE: &str = "spBv1.0";

/// The topics of one edge node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    group: String,
    node: String,
}

/// A command topic of this edge node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandTopic<'a> {
    /// NCMD: to the edge node itself.
    Node,
    /// DCMD: to one of its devices.
    Device(&'a str),
}

impl Topics {
    /// The topics of edge node `node` in group `group`.
    pub fn new(group: &str, node: &str) -> Topics {
        Topics {
            group: group.to_string(),
            node: node.to_string(),
        }
    }

    fn node_topic(&self, kind: &str) -> String {
        format!("{NAMESPACE}/{}/{kind}/{}", self.group, self.node)
    }

    fn device_topic(&self, kind: &str, device: &str) -> String {
        format!("{NAMESPACE}/{}/{kind}/{}/{device}", self.group, self.node)
    }

    /// NBIRTH.
    pub fn nbirth(&self) -> String {
        self.node_topic("NBIRTH")
    }

    /// NDEATH.
    pub fn ndeath(&self) -> String {
        self.node_topic("NDEATH")
    }

    /// NCMD.
    pub fn ncmd(&self) -> String {
        self.node_topic("NCMD")
    }

    /// DBIRTH of `device`.
    pub fn dbirth(&self, device: &str) -> String {
        self.device_topic("DBIRTH", device)
    }

    /// DDATA of `device`.
    pub fn ddata(&self, device: &str) -> String {
        self.device_topic("DDATA", device)
    }

    /// DDEATH of `device`.
    pub fn ddeath(&self, device: &str) -> String {
        self.device_topic("DDEATH", device)
    }

    /// The filter of every DCMD to this node's devices.
    pub fn dcmd_filter(&self) -> String {
        self.device_topic("DCMD", "+")
    }

    /// Which command `topic` is, if it is one of this node's.
    pub fn command<'a>(&self, topic: &'a str) -> Option<CommandTopic<'a>> {
        let mut parts = topic.split('/');
        if parts.next()? != NAMESPACE || parts.next()? != self.group {
            return None;
        }
        let kind = parts.next()?;
        if parts.next()? != self.node {
            return None;
        }
        match (kind, parts.next(), parts.next()) {
            ("NCMD", None, None) => Some(CommandTopic::Node),
            ("DCMD", Some(d), None) if !d.is_empty() => Some(CommandTopic::Device(d)),
            _ => None,
        }
    }
}

/// The retained STATE topic of primary host `host` (Sparkplug 3.0).
pub fn state(host: &str) -> String {
    format!("{NAMESPACE}/STATE/{host}")
}

/// Checks one element of a Sparkplug topic (group, edge node or device id): non-empty, and
/// none of `/ + #`, which would change the topic's structure.
pub fn validate_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("is empty");
    }
    if id.contains(['/', '+', '#']) {
        return Err("contains '/', '+' or '#', which Sparkplug ids must not");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_namespace() {
        let t = Topics::new("plant", "gw1");
        assert_eq!(t.nbirth(), "spBv1.0/plant/NBIRTH/gw1");
        assert_eq!(t.ddata("meter"), "spBv1.0/plant/DDATA/gw1/meter");
        assert_eq!(t.dcmd_filter(), "spBv1.0/plant/DCMD/gw1/+");
        assert_eq!(state("scada"), "spBv1.0/STATE/scada");
    }

    #[test]
    fn only_this_nodes_commands_are_commands() {
        let t = Topics::new("plant", "gw1");
        assert_eq!(
            t.command("spBv1.0/plant/NCMD/gw1"),
            Some(CommandTopic::Node)
        );
        assert_eq!(
            t.command("spBv1.0/plant/DCMD/gw1/meter"),
            Some(CommandTopic::Device("meter"))
        );
        assert_eq!(t.command("spBv1.0/plant/NCMD/gw2"), None);
        assert_eq!(t.command("spBv1.0/other/NCMD/gw1"), None);
        assert_eq!(t.command("spBv1.0/plant/DDATA/gw1/meter"), None);
        assert_eq!(t.command("spBv1.0/plant/DCMD/gw1/meter/x"), None);
        assert_eq!(t.command("spBv1.0/plant/DCMD/gw1/"), None);
    }

    #[test]
    fn ids_with_topic_characters_are_refused() {
        assert!(validate_id("line-3").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("a/b").is_err());
        assert!(validate_id("a+").is_err());
    }
}
