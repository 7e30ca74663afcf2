//! The conformance suite: one test per component kind that runs over *every* discovered
//! component, so a new plugin is covered without writing a test. The checks themselves are
//! host library code (`imgclf::check`), the same that `imgclf plugins check PATH` runs on any
//! plugin. Models are also checked against the reference's parameter counts and state-dict
//! key/shape/dtype lists.

use imgclf::registry::{Discovery, Registry};
use imgclf_plugin_api::Kind;
use imgclf_tests::*;

fn registry() -> Registry {
    let r = Registry::discover(&Discovery {
        cli_paths: vec![plugin_dir()],
        files: vec![],
    })
    .unwrap();
    assert!(
        r.errors.is_empty(),
        "{:?}",
        r.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()
    );
    assert!(
        !r.plugins.is_empty(),
        "no plugins in {}",
        plugin_dir().display()
    );
    r
}

/// Runs the shared suite (`imgclf::check`, what `imgclf plugins check` runs) on every
/// component of `kind`, and fails with its PASS/FAIL report.
fn check_every(kind: Kind) {
    let reg = registry();
    let entries = imgclf::check::entries_of(&reg, kind);
    assert!(!entries.is_empty(), "no {} found", kind.as_str());
    let report = imgclf::check::check(&reg, &entries);
    eprintln!("{}", report.text());
    assert!(report.passed(), "{}", report.text());
}

#[test]
fn every_model_builds_trains_and_round_trips_its_state_dict() {
    check_every(Kind::Model);
}

#[test]
fn every_augmentation_keeps_shapes_targets_and_is_seeded() {
    check_every(Kind::Augmentation);
}

#[test]
fn every_optimizer_descends_and_resumes_exactly() {
    check_every(Kind::Optimizer);
}

#[test]
fn every_scheduler_honours_the_schedule_contract() {
    check_every(Kind::Scheduler);
}

/// The in-tree models against the reference's parameter counts and state-dict key/shape/dtype
/// lists (optional for `imgclf plugins check --reference`, required here: every in-tree model
/// has a case).
#[test]
fn models_match_the_reference_parameter_counts_and_state_dicts() {
    let reg = registry();
    let cases =
        imgclf::check::reference::cases(&workspace().join("tests/data/reference/state_dict"))
            .unwrap();
    let mut report = imgclf::check::Report::default();
    let checked = imgclf::check::reference::check(&reg, &cases, &workspace(), &mut report);
    eprintln!("{}", report.text());
    assert!(report.passed(), "{}", report.text());
    let uncovered: Vec<&str> = cases
        .iter()
        .filter(|c| !checked.contains(&c.name))
        .map(|c| c.name.as_str())
        .collect();
    eprintln!("checked against the reference: {checked:?}\nno plugin loaded for: {uncovered:?}");
    for model in reg.of_kind(Kind::Model) {
        assert!(
            cases.iter().any(|c| c.model == model.info.name),
            "model `{}` has no reference case in tests/data/reference/state_dict",
            model.info.name
        );
    }
    assert!(!checked.is_empty());
}

/// Every integer key of every component declares its range (checked by the host before any
/// work, shown by `plugins inspect`), and its default lies in it.
#[test]
fn every_integer_key_of_every_component_declares_a_range() {
    use imgclf_plugin_api::KeyType;
    let reg = registry();
    let mut missing = Vec::new();
    let mut checked = 0;
    for kind in Kind::ALL {
        for e in reg.of_kind(kind) {
            for k in &e.info.keys {
                let int = match &k.ty {
                    KeyType::Int => true,
                    KeyType::List(inner) => **inner == KeyType::Int,
                    _ => false,
                };
                if !int {
                    continue;
                }
                checked += 1;
                match k.range {
                    None => missing.push(format!("{} ({})", k.key, e.info.name)),
                    Some(r) => {
                        let defaults: Vec<i64> = match &k.default {
                            serde_json::Value::Array(a) => {
                                a.iter().filter_map(|v| v.as_i64()).collect()
                            }
                            v => v.as_i64().into_iter().collect(),
                        };
                        assert!(
                            defaults.iter().all(|d| r.contains(*d)),
                            "{}: default {} outside its range {r}",
                            k.key,
                            k.default
                        );
                    }
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} integer keys found");
    assert!(
        missing.is_empty(),
        "integer keys without a range: {missing:?}"
    );
}
