//! `weft acl list|add|remove`: the access-control rules stored in the controller.

use clap::Subcommand;
use serde_json::json;
use weft_client::{Client, proto};

use super::{Output, print_json};

/// ACL commands (they need `admin` on `cluster` once ACLs are on).
#[derive(Debug, Subcommand)]
pub(crate) enum AclCommand {
    /// Show whether ACLs are on, the broker's config-file rules and the stored rules.
    List,
    /// Allow (or with --deny, deny) an identity operations on a resource (stored in the
    /// controller, for every broker). A deny rule wins over every allow rule.
    Add(RuleArgs),
    /// Remove a stored rule (the same identity, resource, operations and --deny as it was added
    /// with).
    Remove(RuleArgs),
}

/// One rule.
#[derive(Debug, clap::Args)]
pub(crate) struct RuleArgs {
    /// Who: an identity (spiffe://..., a certificate subject, a token's name), a prefix ending
    /// in `*`, or `*`.
    #[arg(long)]
    identity: String,
    /// On what: topic:NAME, topic:PREFIX*, group:NAME, group:PREFIX*, cluster or `*`.
    #[arg(long)]
    resource: String,
    /// What, comma-separated: publish, subscribe, commit, describe, create, alter, delete,
    /// admin, all.
    #[arg(long, value_delimiter = ',', required = true)]
    operations: Vec<String>,
    /// A deny rule: it forbids what it names, whatever allow rules say (and does not imply
    /// describe).
    #[arg(long)]
    deny: bool,
}

/// A rule's permission as shown: "allow" when the broker sent none.
fn permission(rule: &proto::AclRule) -> &str {
    if rule.permission.is_empty() {
        "allow"
    } else {
        &rule.permission
    }
}

fn rule_json(rule: &proto::AclRule) -> serde_json::Value {
    json!({
        "identity": rule.identity,
        "resource": rule.resource,
        "operations": rule.operations,
        "permission": permission(rule),
    })
}

fn rule_text(rule: &proto::AclRule) -> String {
    format!(
        "{}  {}  {}  {}",
        permission(rule),
        rule.identity,
        rule.resource,
        rule.operations.join(",")
    )
}

/// Runs an ACL command.
pub(crate) async fn run(
    client: &Client,
    output: Output,
    command: AclCommand,
) -> anyhow::Result<()> {
    let admin = client.admin();
    match command {
        AclCommand::List => {
            let (enabled, config, stored) = admin.acls().await?;
            match output {
                Output::Json => print_json(&json!({
                    "enabled": enabled,
                    "config_rules": config.iter().map(rule_json).collect::<Vec<_>>(),
                    "stored_rules": stored.iter().map(rule_json).collect::<Vec<_>>(),
                }))?,
                Output::Text => {
                    outln!(
                        "ACLs are {}",
                        if enabled {
                            "on (deny by default)"
                        } else {
                            "off (every call allowed)"
                        }
                    );
                    for rule in &config {
                        outln!("config  {}", rule_text(rule));
                    }
                    for rule in &stored {
                        outln!("stored  {}", rule_text(rule));
                    }
                }
            }
        }
        AclCommand::Add(args) => change(&admin, output, args, true).await?,
        AclCommand::Remove(args) => change(&admin, output, args, false).await?,
    }
    Ok(())
}

async fn change(
    admin: &weft_client::Admin,
    output: Output,
    args: RuleArgs,
    add: bool,
) -> anyhow::Result<()> {
    let rule = proto::AclRule {
        identity: args.identity,
        resource: args.resource,
        operations: args.operations,
        permission: if args.deny { "deny" } else { "allow" }.into(),
    };
    let existed = admin.change_acl(rule.clone(), add).await?;
    if add && args.deny {
        // A broker that predates deny rules ignores the permission and stores an allow rule:
        // make sure a deny rule is what stands, and take an allow rule back otherwise.
        let (_, _, stored) = admin.acls().await?;
        let stands = stored.iter().any(|r| {
            r.identity == rule.identity && r.resource == rule.resource && permission(r) == "deny"
        });
        if !stands {
            let _ = admin.change_acl(rule.clone(), false).await;
            anyhow::bail!(
                "the broker stored no deny rule (it predates deny rules; the rule it stored in \
                 its place was removed): upgrade every broker before adding deny rules"
            );
        }
    }
    if !add && !existed {
        // In either output: a script removing a rule learns it was not there (exit 1).
        anyhow::bail!("no such stored rule: {}", rule_text(&rule));
    }
    match output {
        Output::Json => {
            print_json(&json!({ "rule": rule_json(&rule), "existed": existed, "added": add }))?
        }
        Output::Text => match (add, existed) {
            (true, false) => outln!("added {}", rule_text(&rule)),
            (true, true) => outln!("already there: {}", rule_text(&rule)),
            (false, _) => outln!("removed {}", rule_text(&rule)),
        },
    }
    Ok(())
}
