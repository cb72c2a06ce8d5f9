//! Access control: rules of identity x resource x operations, deny by default once enabled.
//!
//! A rule allows (or, with `permission = "deny"`, denies: deny wins) `identity` (exact, a prefix
//! ending in `*`, or `*`) the `operations` on
//! `resource`: `topic:NAME`, `topic:PREFIX*`, `group:NAME`, `group:PREFIX*`, `cluster`, or `*`
//! (everything). Operations: publish, subscribe, commit, describe, create, alter, delete,
//! admin, or `all`. The rules in force are those of the config file (`[[acl.rules]]`, each
//! broker's own) plus those stored replicated in the controller (`weft acl add`, `POST
//! /v1/acls`). With `acl.enabled = false` (the default) every call is allowed.
//!
//! What each call needs: Publish / PublishStream: publish on the topic. Fetch, Subscribe:
//! subscribe on the topic (and, as a group member, subscribe on the group). CommitOffsets:
//! commit on the group (a reset, `weft group reset-offsets`: alter on the group as well). GetOffsets: describe on the topic (and the group, when asked).
//! GetTopic, ListTopics (filtered): describe. CreateTopic: create on the topic; UpdateTopic:
//! alter; DeleteTopic: delete. DescribeGroup, ListGroups (filtered): describe on the group;
//! DeleteGroup, LeaveGroup: delete / subscribe on the group. Cluster calls and the admin API's
//! cluster routes: admin on `cluster`; reading the cluster's status: describe on `cluster`.
//! Any operation allowed on a resource allows describing it (as Kafka's do). Brokers
//! (identities in `auth.broker_identities`) may do everything; a call a broker
//! forwards is checked as the original caller's.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::auth::{Identity, matches};
use crate::error::BrokerError;

/// What a call does.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Publish records.
    Publish,
    /// Read records, join a group.
    Subscribe,
    /// Commit a group's offsets.
    Commit,
    /// Read metadata (topics, groups, offsets, cluster status).
    Describe,
    /// Create topics.
    Create,
    /// Change topics' settings.
    Alter,
    /// Delete topics and groups.
    Delete,
    /// Operate the cluster (leadership, replicas, brokers, ACLs, log level).
    Admin,
    /// Every operation.
    All,
}

impl Operation {
    /// Its name, as rules spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Publish => "publish",
            Operation::Subscribe => "subscribe",
            Operation::Commit => "commit",
            Operation::Describe => "describe",
            Operation::Create => "create",
            Operation::Alter => "alter",
            Operation::Delete => "delete",
            Operation::Admin => "admin",
            Operation::All => "all",
        }
    }

    /// Parses a name.
    pub fn parse(name: &str) -> Option<Operation> {
        Some(match name.trim() {
            "publish" => Operation::Publish,
            "subscribe" => Operation::Subscribe,
            "commit" => Operation::Commit,
            "describe" => Operation::Describe,
            "create" => Operation::Create,
            "alter" => Operation::Alter,
            "delete" => Operation::Delete,
            "admin" => Operation::Admin,
            "all" => Operation::All,
            _ => return None,
        })
    }
}

/// What a call acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// A topic.
    Topic(&'a str),
    /// A consumer group.
    Group(&'a str),
    /// The cluster.
    Cluster,
}

impl std::fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // (Clipped: a refusal and its audit line never echo a hostile name whole.)
            Resource::Topic(t) => write!(f, "topic:{}", crate::error::clip(t)),
            Resource::Group(g) => write!(f, "group:{}", crate::error::clip(g)),
            Resource::Cluster => write!(f, "cluster"),
        }
    }
}

/// Whether a rule allows or denies what it names.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// The rule allows (the default).
    #[default]
    Allow,
    /// The rule denies, whatever other rules allow.
    Deny,
}

impl Permission {
    /// Its name in rules, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Allow => "allow",
            Permission::Deny => "deny",
        }
    }

    /// From its name; an empty name is `allow`.
    pub fn parse(name: &str) -> Option<Permission> {
        match name {
            "" | "allow" => Some(Permission::Allow),
            "deny" => Some(Permission::Deny),
            _ => None,
        }
    }

    fn is_allow(&self) -> bool {
        *self == Permission::Allow
    }
}

/// One rule: allows (or, with `permission = "deny"`, denies) `identity` the `operations` on
/// `resource`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// Who: an identity, a prefix ending in `*`, or `*`.
    pub identity: String,
    /// On what: `topic:NAME`, `topic:PREFIX*`, `group:NAME`, `group:PREFIX*`, `cluster` or `*`.
    pub resource: String,
    /// What: publish, subscribe, commit, describe, create, alter, delete, admin, all.
    pub operations: Vec<Operation>,
    /// `allow` (the default) or `deny`: a deny rule wins over every allow rule.
    #[serde(default, skip_serializing_if = "Permission::is_allow")]
    pub permission: Permission,
}

impl AclRule {
    /// Checks the rule's fields; Err says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.identity.trim().is_empty() {
            return Err("identity must not be empty (\"*\" is anyone)".into());
        }
        if self.identity.len() > 1024 || self.resource.len() > 1024 {
            return Err("identity and resource are at most 1024 bytes".into());
        }
        let resource = self.resource.as_str();
        let ok = resource == "*"
            || resource == "cluster"
            || resource
                .strip_prefix("topic:")
                .or_else(|| resource.strip_prefix("group:"))
                .is_some_and(|name| !name.is_empty());
        if !ok {
            return Err(format!(
                "resource {resource:?} is none of topic:NAME, topic:PREFIX*, group:NAME, group:PREFIX*, cluster, *"
            ));
        }
        if self.operations.is_empty() {
            return Err("operations must not be empty".into());
        }
        Ok(())
    }

    /// Whether the rule names `identity` doing `operation` on `resource` (allowing it, or for a
    /// deny rule, denying it).
    pub fn allows(&self, identity: &str, operation: Operation, resource: Resource<'_>) -> bool {
        if !matches(&self.identity, identity) {
            return false;
        }
        // As in Kafka, any operation allowed on a resource lets one describe it (a consumer
        // reads the topic's partitions before it subscribes); a deny rule denies describing
        // only when it names describe (or all).
        let implies_describe = self.permission == Permission::Allow;
        if !self.operations.iter().any(|o| {
            *o == Operation::All
                || *o == operation
                || (implies_describe && operation == Operation::Describe)
        }) {
            return false;
        }
        if self.resource == "*" {
            return true;
        }
        match resource {
            Resource::Cluster => self.resource == "cluster",
            Resource::Topic(name) => self
                .resource
                .strip_prefix("topic:")
                .is_some_and(|p| matches(p, name)),
            Resource::Group(name) => self
                .resource
                .strip_prefix("group:")
                .is_some_and(|p| matches(p, name)),
        }
    }
}

/// The broker's access control: the config's rules and whether it is on; the controller's
/// rules are passed in at each check (they change at run time).
#[derive(Debug, Clone)]
pub struct Acl {
    enabled: bool,
    rules: Arc<Vec<AclRule>>,
}

impl Acl {
    /// From the config.
    pub fn new(enabled: bool, rules: Vec<AclRule>) -> Acl {
        Acl {
            enabled,
            rules: Arc::new(rules),
        }
    }

    /// Whether checks are on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The config file's rules.
    pub fn config_rules(&self) -> &[AclRule] {
        &self.rules
    }

    /// Whether `identity` may do `operation` on `resource`, given the controller's rules.
    pub fn allows(
        &self,
        identity: &Identity,
        operation: Operation,
        resource: Resource<'_>,
        stored: &[AclRule],
    ) -> bool {
        self.refusal(identity, operation, resource, stored)
            .is_none()
    }

    /// Why `identity` may not do `operation` on `resource`, if it may not: no rule allows it,
    /// or a deny rule forbids it (deny wins).
    fn refusal(
        &self,
        identity: &Identity,
        operation: Operation,
        resource: Resource<'_>,
        stored: &[AclRule],
    ) -> Option<&'static str> {
        if !self.enabled || identity.broker {
            return None;
        }
        let naming = |r: &&AclRule| r.allows(&identity.principal, operation, resource);
        let mut allowed = false;
        for rule in self.rules.iter().chain(stored).filter(naming) {
            match rule.permission {
                Permission::Deny => return Some("a deny rule forbids it"),
                Permission::Allow => allowed = true,
            }
        }
        (!allowed).then_some("no ACL rule allows it")
    }

    /// [`Acl::allows`], as a PERMISSION_DENIED error (UNAUTHENTICATED for anonymous callers)
    /// with an audit line when not.
    pub fn check(
        &self,
        identity: &Identity,
        operation: Operation,
        resource: Resource<'_>,
        stored: &[AclRule],
    ) -> Result<(), BrokerError> {
        let Some(why) = self.refusal(identity, operation, resource, stored) else {
            return Ok(());
        };
        let message = format!(
            "{} may not {} {resource}: {why}",
            identity.principal,
            operation.as_str()
        );
        tracing::warn!(
            target: "weft::audit",
            principal = identity.principal.as_str(),
            source = identity.source.as_str(),
            operation = operation.as_str(),
            resource = %resource,
            outcome = "denied",
            "call refused"
        );
        if identity.source == crate::auth::Source::Anonymous {
            Err(BrokerError::Unauthenticated(format!(
                "{message}; present a client certificate or a bearer token"
            )))
        } else {
            Err(BrokerError::PermissionDenied(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(identity: &str, resource: &str, operations: &[Operation]) -> AclRule {
        AclRule {
            identity: identity.into(),
            resource: resource.into(),
            operations: operations.to_vec(),
            permission: Permission::Allow,
        }
    }

    fn deny(identity: &str, resource: &str, operations: &[Operation]) -> AclRule {
        AclRule {
            permission: Permission::Deny,
            ..rule(identity, resource, operations)
        }
    }

    #[test]
    fn a_deny_rule_wins_over_allow_rules() {
        let app = Identity {
            principal: "app".into(),
            source: crate::auth::Source::Token,
            broker: false,
            forwarded: false,
        };
        let acl = Acl::new(
            true,
            vec![
                rule("*", "topic:*", &[Operation::All]),
                deny("app", "topic:secret-*", &[Operation::Publish]),
            ],
        );
        assert!(acl.allows(&app, Operation::Publish, Resource::Topic("orders"), &[]));
        let refused = acl.check(&app, Operation::Publish, Resource::Topic("secret-1"), &[]);
        match refused {
            Err(BrokerError::PermissionDenied(message)) => {
                assert!(message.contains("a deny rule forbids it"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        // Denying publish leaves reading and describing alone; others are not named.
        assert!(acl.allows(&app, Operation::Subscribe, Resource::Topic("secret-1"), &[]));
        assert!(acl.allows(&app, Operation::Describe, Resource::Topic("secret-1"), &[]));
        let other = Identity {
            principal: "other".into(),
            ..app.clone()
        };
        assert!(acl.allows(&other, Operation::Publish, Resource::Topic("secret-1"), &[]));
        // A stored deny of everything, describe included.
        let stored = [deny("app", "*", &[Operation::All])];
        assert!(!acl.allows(
            &app,
            Operation::Describe,
            Resource::Topic("orders"),
            &stored
        ));
        assert!(acl.allows(
            &other,
            Operation::Describe,
            Resource::Topic("orders"),
            &stored
        ));
        // Brokers are never refused.
        let broker = Identity {
            broker: true,
            ..app.clone()
        };
        assert!(acl.allows(
            &broker,
            Operation::Publish,
            Resource::Topic("secret-1"),
            &stored
        ));
        // Allow rules serialize as before (no `permission` key); deny rules say so.
        let json = serde_json::to_string(&rule("a", "*", &[Operation::All])).expect("json");
        assert!(!json.contains("permission"), "{json}");
        let json = serde_json::to_string(&deny("a", "*", &[Operation::All])).expect("json");
        let back: AclRule = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.permission, Permission::Deny);
    }

    #[test]
    fn rules_match_identity_resource_and_operation() {
        let r = rule(
            "spiffe://td/ns/shop/*",
            "topic:orders-*",
            &[Operation::Publish],
        );
        assert!(r.allows(
            "spiffe://td/ns/shop/sa/a",
            Operation::Publish,
            Resource::Topic("orders-eu")
        ));
        assert!(!r.allows(
            "spiffe://td/ns/shop/sa/a",
            Operation::Subscribe,
            Resource::Topic("orders-eu")
        ));
        assert!(r.allows(
            "spiffe://td/ns/shop/sa/a",
            Operation::Describe,
            Resource::Topic("orders-eu")
        ));
        assert!(!r.allows(
            "spiffe://td/ns/other/sa/a",
            Operation::Publish,
            Resource::Topic("orders-eu")
        ));
        assert!(!r.allows(
            "spiffe://td/ns/shop/sa/a",
            Operation::Publish,
            Resource::Topic("payments")
        ));
        assert!(!r.allows(
            "spiffe://td/ns/shop/sa/a",
            Operation::Publish,
            Resource::Group("orders-eu")
        ));
        let admin = rule("ops", "*", &[Operation::All]);
        assert!(admin.allows("ops", Operation::Admin, Resource::Cluster));
        assert!(admin.allows("ops", Operation::Delete, Resource::Group("g")));
        let cluster = rule("*", "cluster", &[Operation::Describe]);
        assert!(cluster.allows("anyone", Operation::Describe, Resource::Cluster));
        assert!(!cluster.allows("anyone", Operation::Describe, Resource::Topic("t")));
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(
            rule("", "topic:a", &[Operation::Publish])
                .validate()
                .is_err()
        );
        assert!(
            rule("x", "queue:a", &[Operation::Publish])
                .validate()
                .is_err()
        );
        assert!(
            rule("x", "topic:", &[Operation::Publish])
                .validate()
                .is_err()
        );
        assert!(rule("x", "topic:a", &[]).validate().is_err());
        assert!(
            rule("x", "group:g*", &[Operation::Commit])
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn disabled_allows_everything_and_enabled_denies_by_default() {
        let who = Identity {
            principal: "app".into(),
            source: crate::auth::Source::Token,
            broker: false,
            forwarded: false,
        };
        let off = Acl::new(false, Vec::new());
        assert!(
            off.check(&who, Operation::Delete, Resource::Cluster, &[])
                .is_ok()
        );
        let on = Acl::new(true, vec![rule("app", "topic:t", &[Operation::Publish])]);
        assert!(
            on.check(&who, Operation::Publish, Resource::Topic("t"), &[])
                .is_ok()
        );
        assert!(matches!(
            on.check(&who, Operation::Publish, Resource::Topic("u"), &[]),
            Err(BrokerError::PermissionDenied(_))
        ));
        let stored = [rule("app", "topic:u", &[Operation::Publish])];
        assert!(
            on.check(&who, Operation::Publish, Resource::Topic("u"), &stored)
                .is_ok()
        );
        let anonymous = Identity::anonymous();
        assert!(matches!(
            on.check(&anonymous, Operation::Publish, Resource::Topic("t"), &[]),
            Err(BrokerError::Unauthenticated(_))
        ));
    }
}
