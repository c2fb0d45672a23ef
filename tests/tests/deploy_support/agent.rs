//! The agent's real command line (`policy_agent::cli::Args`, clap), used to check what the manifests pass to it.

use std::collections::BTreeMap;

use clap::{ArgAction, CommandFactory, FromArgMatches};
use k8s_openapi::api::core::v1::Container;
use policy_agent::cli::Args;

/// One `--flag` of the agent.
#[derive(Clone, Debug)]
pub struct Flag {
    pub long: String,
    pub env: Option<String>,
    /// `--flag` alone (a switch) rather than `--flag=VALUE`.
    pub switch: bool,
}

/// Every long flag the agent accepts, --help and --version included.
pub fn flags() -> Vec<Flag> {
    let mut command = Args::command();
    command.build();
    command
        .get_arguments()
        .filter_map(|arg| {
            Some(Flag {
                long: arg.get_long()?.to_owned(),
                env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
                switch: matches!(
                    arg.get_action(),
                    ArgAction::SetTrue | ArgAction::Help | ArgAction::Version
                ),
            })
        })
        .collect()
}

pub fn flag(long: &str) -> Option<Flag> {
    flags().into_iter().find(|f| f.long == long)
}

pub fn flag_for_env(name: &str) -> Option<Flag> {
    flags().into_iter().find(|f| f.env.as_deref() == Some(name))
}

/// Parses the agent's arguments exactly as the container would start it: its `args` (the image's entrypoint is the
/// agent), plus every `env` entry turned into the flag whose env fallback it is. `$(VAR)` references are expanded
/// as the kubelet does. Downward-API values (`fieldRef`) are replaced by `field_value(fieldPath)`.
///
/// The test process's own environment plays no part: the env fallbacks are removed from the clap command before
/// parsing, so a NODE_NAME set on the test machine cannot stand in for one the manifest forgot.
pub fn parse_container(
    container: &Container,
    field_value: impl Fn(&str) -> String,
) -> Result<Args, String> {
    if let Some(command) = &container.command {
        return Err(format!(
            "container {}: `command` {command:?} overrides the image's entrypoint (the agent); pass `args` only",
            container.name
        ));
    }

    let mut env_values = BTreeMap::new();
    let mut argv = vec!["policy-agent".to_owned()];
    let mut env_flags = Vec::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), None) => value.clone(),
            (None, Some(source)) => match &source.field_ref {
                Some(field) if source.resource_field_ref.is_none() => {
                    field_value(&field.field_path)
                }
                _ => {
                    return Err(format!(
                        "env {}: only fieldRef sources are expected",
                        var.name
                    ));
                }
            },
            _ => {
                return Err(format!(
                    "env {}: needs exactly one of value, valueFrom",
                    var.name
                ));
            }
        };
        let flag = flag_for_env(&var.name).ok_or_else(|| {
            format!(
                "env {} is not an environment fallback of any agent flag",
                var.name
            )
        })?;
        if flag.switch {
            match value.as_str() {
                "true" => env_flags.push(format!("--{}", flag.long)),
                "false" => {}
                other => return Err(format!("env {}: {other:?} is not true or false", var.name)),
            }
        } else {
            env_flags.push(format!("--{}={value}", flag.long));
        }
        env_values.insert(var.name.clone(), value);
    }

    for arg in container.args.iter().flatten() {
        let arg = expand(arg, &env_values);
        let Some(body) = arg.strip_prefix("--") else {
            return Err(format!("argument {arg:?} is not a --flag"));
        };
        let (long, value) = match body.split_once('=') {
            Some((long, value)) => (long, Some(value)),
            None => (body, None),
        };
        let flag = flag(long).ok_or_else(|| format!("--{long} is not a flag of policy-agent"))?;
        if flag.switch != value.is_none() {
            return Err(format!(
                "--{long}: {} (write --flag=value for flags that take one)",
                if flag.switch {
                    "is a switch and takes no value"
                } else {
                    "needs =VALUE"
                }
            ));
        }
        argv.push(arg);
    }
    argv.extend(env_flags);

    let command = Args::command().mut_args(|arg| arg.env(None::<&'static str>));
    let matches = command
        .try_get_matches_from(&argv)
        .map_err(|e| format!("policy-agent rejects {argv:?}: {e}"))?;
    Args::from_arg_matches(&matches).map_err(|e| format!("{argv:?}: {e}"))
}

/// The kubelet's `$(VAR)` expansion in args (`$$` escapes a dollar); unknown references stay as they are.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = tail
            .strip_prefix("$(")
            .and_then(|t| t.split_once(')'))
            .filter(|(name, _)| env.contains_key(*name))
        {
            out.push_str(&env[name]);
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}
