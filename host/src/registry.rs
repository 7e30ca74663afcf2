//! Plugin discovery and the component registry: which plugin provides the model, optimizer,
//! scheduler and augmentations a config names. The registry is the only dispatch on names.

use anyhow::{bail, Context, Result};
use imgclf_plugin_api::ffi::{load_plugin, LoadError, LoadedPlugin};
use imgclf_plugin_api::{ComponentInfo, Kind};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where plugins come from, in search order.
#[derive(Clone, Debug, Default)]
pub struct Discovery {
    /// `--plugin-path DIR` (repeatable), searched first.
    pub cli_paths: Vec<PathBuf>,
    /// Explicit plugin files (`--plugin path/to/libfoo.so`).
    pub files: Vec<PathBuf>,
}

/// Folders searched for plugins: `--plugin-path`, then `IMGCLF_PLUGIN_PATH` (`:`-separated),
/// then the folders beside the executable (`../lib/imgclf/plugins` and `plugins/`).
pub fn search_path(cli_paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = cli_paths.to_vec();
    if let Some(env) = std::env::var_os("IMGCLF_PLUGIN_PATH") {
        dirs.extend(std::env::split_paths(&env).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir.join("../lib/imgclf/plugins"));
        dirs.push(exe_dir.join("plugins"));
    }
    dirs
}

/// One component and the plugin that provides it.
#[derive(Clone, Debug)]
pub struct Entry {
    pub plugin: usize,
    pub info: ComponentInfo,
}

/// Every loaded plugin, the load errors of the files that failed, and the components by name.
pub struct Registry {
    pub plugins: Vec<LoadedPlugin>,
    pub errors: Vec<LoadError>,
    pub searched: Vec<PathBuf>,
    components: BTreeMap<(Kind, String), Entry>,
}

fn is_shared_library(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("so" | "dylib" | "dll")
    )
}

impl Registry {
    /// Loads every plugin file found. A file that fails to load is recorded in `errors` and
    /// never hides the others. The first plugin of a given name wins (search order), as with
    /// `PATH`; two components of the same kind and name in different plugins is a hard error.
    pub fn discover(d: &Discovery) -> Result<Registry> {
        let searched = search_path(&d.cli_paths);
        let mut files: Vec<PathBuf> = d.files.clone();
        for dir in &searched {
            let Ok(read) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut found: Vec<PathBuf> = read
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_shared_library(p))
                .collect();
            found.sort();
            files.extend(found);
        }
        let mut seen_canonical = std::collections::HashSet::new();
        let mut plugins: Vec<LoadedPlugin> = Vec::new();
        let mut errors = Vec::new();
        for file in files {
            let canonical = file.canonicalize().unwrap_or_else(|_| file.clone());
            if !seen_canonical.insert(canonical) {
                continue;
            }
            match load_plugin(&file) {
                Ok(p) => {
                    if let Some(first) = plugins.iter().find(|q| q.name == p.name) {
                        tracing::debug!(
                            "plugin `{}` at {} shadowed by {}",
                            p.name,
                            file.display(),
                            first.path.display()
                        );
                        continue;
                    }
                    plugins.push(p);
                }
                Err(e) => {
                    tracing::debug!("{}: {}", e.path.display(), e.detail);
                    errors.push(e);
                }
            }
        }
        let mut components: BTreeMap<(Kind, String), Entry> = BTreeMap::new();
        for (i, p) in plugins.iter().enumerate() {
            for info in &p.components {
                let key = (info.kind, info.name.clone());
                if let Some(other) = components.get(&key) {
                    bail!(
                        "two plugins provide the {} `{}`: {} and {}; remove one of them from the plugin path",
                        info.kind.as_str(),
                        info.name,
                        plugins[other.plugin].path.display(),
                        p.path.display()
                    );
                }
                components.insert(
                    key,
                    Entry {
                        plugin: i,
                        info: info.clone(),
                    },
                );
            }
        }
        Ok(Registry {
            plugins,
            errors,
            searched,
            components,
        })
    }

    pub fn get(&self, kind: Kind, name: &str) -> Option<&Entry> {
        self.components.get(&(kind, name.to_string()))
    }

    /// Like [`Registry::get`], with an error listing what is available.
    pub fn require(&self, kind: Kind, name: &str, key: &str) -> Result<&Entry> {
        self.get(kind, name).with_context(|| {
            let available: Vec<&str> = self.of_kind(kind).map(|e| e.info.name.as_str()).collect();
            format!(
                "{key} = '{name}': no loaded plugin provides the {} `{name}` (not supported yet, or its plugin is \
                 not on the plugin path); available: {}{}",
                kind.as_str(),
                if available.is_empty() { "none".to_string() } else { available.join(", ") },
                self.load_error_hint()
            )
        })
    }

    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Entry> {
        self.components
            .values()
            .filter(move |e| e.info.kind == kind)
    }

    pub fn plugin(&self, entry: &Entry) -> &LoadedPlugin {
        &self.plugins[entry.plugin]
    }

    pub fn plugin_by_name(&self, name: &str) -> Option<&LoadedPlugin> {
        self.plugins.iter().find(|p| p.name == name)
    }

    fn load_error_hint(&self) -> String {
        if self.errors.is_empty() {
            String::new()
        } else {
            format!(
                " ({} plugin file(s) failed to load: see the warnings above)",
                self.errors.len()
            )
        }
    }

    /// Logs every load error as a warning (all together, once).
    pub fn warn_load_errors(&self) {
        for e in &self.errors {
            tracing::warn!("plugin not loaded: {e}");
        }
    }
}
