//! Installing `policy-agent-cni` on the node: the binary into the CNI binary directory and an
//! entry at the end of the node's CNI configuration list (`--cni-conf-dir`, `--cni-bin-dir`).
//!
//! The runtime (containerd, CRI-O) uses the first file of the configuration directory by name
//! among `*.conflist`, `*.conf` and `*.json`, as libcni orders them; that file is the one chained.
//! The CNI that owns it (kindnet, flannel) may rewrite it at any time without the entry, so the
//! agent checks it every [`RECHECK`] and puts the entry back (counted in
//! `policy_agent_cni_chain_repairs`). Writes are atomic (a temporary file in the same directory,
//! renamed over the old one), so the runtime never reads half a file.
//!
//! The entry stays when the agent stops: a pod created while no agent runs on the node waits
//! (its ADD fails, the kubelet retries) instead of starting unpoliced. To uninstall, remove the
//! entry first: `policy-agent cni uninstall --cni-conf-dir DIR [--cni-bin-dir DIR]` (see the
//! deploy README).

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};

use super::PLUGIN_TYPE;

/// How often the chain entry is checked.
pub const RECHECK: Duration = Duration::from_secs(5);

/// Where and how to install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Install {
    pub conf_dir: PathBuf,
    /// `None`: the binary is already there (installed by other means).
    pub bin_dir: Option<PathBuf>,
    /// The agent's socket as the plugin reaches it.
    pub socket: PathBuf,
    pub timeout_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("CNI configuration directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "CNI configuration directory {dir}: no *.conflist, *.conf or *.json yet (the CNI has not \
         written its configuration)"
    )]
    NoConfig { dir: PathBuf },
    #[error("CNI configuration {file}: {what}")]
    Config { file: PathBuf, what: String },
    #[error("{file}: {source}")]
    Write {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What [`ensure`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ensured {
    pub file: PathBuf,
    /// The entry was missing or different and was written.
    pub repaired: bool,
}

/// The list entry the agent maintains.
pub fn entry(socket: &Path, timeout_seconds: u64) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "socket": socket.display().to_string(),
        "timeoutSeconds": timeout_seconds,
    })
}

/// The configuration file the runtime reads: the first by name among `*.conflist`, `*.conf` and
/// `*.json`.
pub fn primary(conf_dir: &Path) -> Result<Option<PathBuf>, ChainError> {
    let entries = fs::read_dir(conf_dir).map_err(|source| ChainError::Dir {
        dir: conf_dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// `text` (a configuration list) with `entry` as its last plugin and no other entry of this
/// plugin; `None` when it already is exactly that.
pub fn with_entry(text: &str, entry: &Value) -> Result<Option<String>, String> {
    let mut list: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or(
            "no \"plugins\" list: a single-plugin configuration (.conf) cannot be chained; \
             convert it to a .conflist",
        )?;
    if plugins.iter().all(is_ours) {
        return Err("no plugin but this one: nothing creates the pod's interface".into());
    }
    if plugins.last() == Some(entry) && plugins.iter().filter(|p| is_ours(p)).count() == 1 {
        return Ok(None);
    }
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry.clone());
    Ok(Some(
        serde_json::to_string_pretty(&list).expect("serializable") + "\n",
    ))
}

/// `text` without this plugin's entries; `None` when it has none.
pub fn without_entry(text: &str) -> Result<Option<String>, String> {
    let mut list: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
        return Ok(None);
    };
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    if plugins.len() == before {
        return Ok(None);
    }
    Ok(Some(
        serde_json::to_string_pretty(&list).expect("serializable") + "\n",
    ))
}

fn is_ours(plugin: &Value) -> bool {
    plugin["type"].as_str() == Some(PLUGIN_TYPE)
}

/// Puts the entry into the primary configuration if it is missing or different.
pub fn ensure(install: &Install) -> Result<Ensured, ChainError> {
    let file = primary(&install.conf_dir)?.ok_or_else(|| ChainError::NoConfig {
        dir: install.conf_dir.clone(),
    })?;
    let text = fs::read_to_string(&file).map_err(|source| ChainError::Write {
        file: file.clone(),
        source,
    })?;
    let entry = entry(&install.socket, install.timeout_seconds);
    let changed = with_entry(&text, &entry).map_err(|what| ChainError::Config {
        file: file.clone(),
        what,
    })?;
    let repaired = changed.is_some();
    if let Some(new) = changed {
        write_atomically(&file, new.as_bytes(), None)?;
    }
    Ok(Ensured { file, repaired })
}

/// Removes the entry from every configuration file of `conf_dir`; returns the files changed.
pub fn uninstall(conf_dir: &Path) -> Result<Vec<PathBuf>, ChainError> {
    let entries = fs::read_dir(conf_dir).map_err(|source| ChainError::Dir {
        dir: conf_dir.to_path_buf(),
        source,
    })?;
    let mut changed = Vec::new();
    let mut files: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    files.sort();
    for file in files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
    {
        let text = fs::read_to_string(&file).map_err(|source| ChainError::Write {
            file: file.clone(),
            source,
        })?;
        if let Some(new) = without_entry(&text).map_err(|what| ChainError::Config {
            file: file.clone(),
            what,
        })? {
            write_atomically(&file, new.as_bytes(), None)?;
            changed.push(file);
        }
    }
    Ok(changed)
}

/// Copies `source` (the agent's own executable) to `bin_dir/policy-agent-cni` unless the same
/// bytes are there. Returns whether it copied.
pub fn install_binary(source: &Path, bin_dir: &Path) -> Result<bool, ChainError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let bytes = fs::read(source).map_err(|source_err| ChainError::Write {
        file: source.to_path_buf(),
        source: source_err,
    })?;
    if fs::read(&target).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    write_atomically(&target, &bytes, Some(0o755))?;
    Ok(true)
}

/// Writes `bytes` to a temporary name in `file`'s directory (not matching the runtime's
/// patterns) and renames it over `file`.
fn write_atomically(file: &Path, bytes: &[u8], mode: Option<u32>) -> Result<(), ChainError> {
    let err = |source| ChainError::Write {
        file: file.to_path_buf(),
        source,
    };
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = file.with_file_name(format!(".{name}.policy-agent.tmp"));
    let mut f = fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    if let Some(mode) = mode {
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    fs::rename(&tmp, file).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDNET: &str = r#"{"cniVersion":"0.3.1","name":"kindnet","plugins":[
        {"type":"ptp","ipMasq":false,"ipam":{"type":"host-local"},"mtu":1500},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    fn install(dir: &Path) -> Install {
        Install {
            conf_dir: dir.to_path_buf(),
            bin_dir: None,
            socket: "/run/policy-agent-cni/cni.sock".into(),
            timeout_seconds: 10,
        }
    }

    #[test]
    fn the_entry_goes_last_once() {
        let e = entry(Path::new("/s.sock"), 3);
        let once = with_entry(KINDNET, &e).unwrap().unwrap();
        let v: Value = serde_json::from_str(&once).unwrap();
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[0]["type"], "ptp");
        assert_eq!(plugins[2], e);
        assert_eq!(with_entry(&once, &e).unwrap(), None, "already there");
        // Another position or other settings are rewritten.
        let moved = json!({"cniVersion": "0.3.1", "name": "k", "plugins": [e, {"type": "ptp"}]});
        let fixed: Value =
            serde_json::from_str(&with_entry(&moved.to_string(), &e).unwrap().unwrap()).unwrap();
        assert_eq!(fixed["plugins"][0]["type"], "ptp");
        assert_eq!(fixed["plugins"].as_array().unwrap().len(), 2);
        let other = entry(Path::new("/other.sock"), 3);
        let changed: Value =
            serde_json::from_str(&with_entry(&once, &other).unwrap().unwrap()).unwrap();
        assert_eq!(changed["plugins"][2], other);
        assert_eq!(changed["plugins"].as_array().unwrap().len(), 3);
        // Back out.
        let out: Value = serde_json::from_str(&without_entry(&once).unwrap().unwrap()).unwrap();
        assert_eq!(out, serde_json::from_str::<Value>(KINDNET).unwrap());
        assert_eq!(without_entry(KINDNET).unwrap(), None);
    }

    #[test]
    fn configurations_that_cannot_be_chained_say_why() {
        let e = entry(Path::new("/s.sock"), 3);
        let conf = r#"{"cniVersion":"0.3.1","name":"cbr0","type":"bridge"}"#;
        assert!(with_entry(conf, &e).unwrap_err().contains(".conflist"));
        assert!(with_entry("{", &e).unwrap_err().contains("not JSON"));
        let only_ours = json!({"name": "x", "plugins": [e]}).to_string();
        assert!(
            with_entry(&only_ours, &e)
                .unwrap_err()
                .contains("nothing creates")
        );
    }

    #[test]
    fn ensure_chains_the_first_file_and_repairs_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let err = ensure(&install(dir.path())).unwrap_err();
        assert!(matches!(err, ChainError::NoConfig { .. }), "{err}");
        fs::write(dir.path().join("20-other.conflist"), KINDNET).unwrap();
        fs::write(dir.path().join("10-kindnet.conflist"), KINDNET).unwrap();
        fs::write(dir.path().join("05-notes.txt"), "not a configuration").unwrap();
        let first = ensure(&install(dir.path())).unwrap();
        assert_eq!(first.file, dir.path().join("10-kindnet.conflist"));
        assert!(first.repaired);
        assert!(!ensure(&install(dir.path())).unwrap().repaired);
        let text = fs::read_to_string(&first.file).unwrap();
        assert!(text.contains(PLUGIN_TYPE));
        assert_eq!(
            fs::read_to_string(dir.path().join("20-other.conflist")).unwrap(),
            KINDNET
        );
        // The owner rewrites its file: the next check puts the entry back.
        fs::write(&first.file, KINDNET).unwrap();
        assert!(ensure(&install(dir.path())).unwrap().repaired);
        // No temporary file is left where the runtime looks.
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(uninstall(dir.path()).unwrap(), vec![first.file.clone()]);
        assert!(
            !fs::read_to_string(&first.file)
                .unwrap()
                .contains(PLUGIN_TYPE)
        );
    }

    #[test]
    fn the_binary_is_copied_when_it_differs() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("policy-agent");
        fs::write(&src, b"v1").unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        assert!(install_binary(&src, &bin).unwrap());
        assert!(!install_binary(&src, &bin).unwrap());
        fs::write(&src, b"v2").unwrap();
        assert!(install_binary(&src, &bin).unwrap());
        let target = bin.join(PLUGIN_TYPE);
        assert_eq!(fs::read(&target).unwrap(), b"v2");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }
}
