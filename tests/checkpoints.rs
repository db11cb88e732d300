//! Checkpoint and model files: nothing non-finite is ever written, and every file carries a
//! checksum of its tensors that is verified on load.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sgr_core::checkpoint::{
    check_finite, load_params, load_training_checkpoint, save_params, save_training_checkpoint,
    CHECKSUM_KEY,
};
use sgr_core::method::Method;
use sgr_core::network::LocalNetwork;
use sgr_core::objective::Batch;
use sgr_core::trainer::Trainer;
use sgr_core::Error;
use sgr_integration_tests::{labels, randn, resnet, trainer_config};
use sgr_models::HeadKind;

const RUNNING_VAR: &str = "layer1.0.bn1.running_var";

fn net(seed: u64) -> LocalNetwork {
    resnet(8, 3, 2, HeadKind::ZeroConvOneFc, seed, DType::F32)
}

fn trainer(seed: u64) -> Trainer {
    Trainer::new(net(seed), trainer_config(Method::greedy())).unwrap()
}

/// A trainer after two steps, so that its optimizers hold momentum buffers.
fn trained(seed: u64) -> Trainer {
    let mut t = trainer(seed);
    for s in 0..2 {
        let x = randn(&[8, 3, 8, 8], 1.0, s, DType::F32);
        t.train_step(&Batch::labelled(x, labels(8, s + 100)))
            .unwrap();
    }
    t
}

/// Sets element 0 of the network's tensor `name` to `value`.
fn poison(net: &LocalNetwork, name: &str, value: f32) {
    let p = net.params().into_iter().find(|p| p.name == name).unwrap();
    let mut v = p
        .var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    v[0] = value;
    p.var
        .set(&Tensor::from_vec(v, p.var.dims(), &Device::Cpu).unwrap())
        .unwrap();
}

/// Every tensor's bits, by name.
fn bits(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, t)| {
            let b = match t.dtype() {
                DType::F32 => t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                DType::F64 => t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                d => panic!("{n}: unexpected dtype {d:?}"),
            };
            (n, b)
        })
        .collect();
    v.sort();
    v
}

fn net_bits(net: &LocalNetwork) -> Vec<(String, Vec<u8>)> {
    bits(
        net.params()
            .into_iter()
            .map(|p| (p.name, p.var.as_tensor().clone())),
    )
}

fn optim_bits(t: &Trainer) -> Vec<Vec<(String, Vec<u8>)>> {
    t.optimizers()
        .iter()
        .map(|o| bits(o.state().unwrap()))
        .collect()
}

/// Flips the low bit of one byte in the middle of the file's data section (after the header).
fn flip_data_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let start = 8 + header;
    assert!(bytes.len() > start + 16, "no data section");
    let at = start + (bytes.len() - start) / 2;
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn expect_non_finite(e: Error, tensor: &str, file: Option<&str>) {
    let msg = e.to_string();
    match &e {
        Error::NonFinite { tensor: t, path } => {
            assert_eq!(t, tensor, "{msg}");
            assert_eq!(
                path.as_ref()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .as_deref(),
                file,
                "{msg}"
            );
        }
        other => panic!("expected a non-finite error, got {other:?}"),
    }
    assert!(msg.contains(tensor), "{msg}");
    if let Some(f) = file {
        assert!(msg.contains(f) && msg.contains("not written"), "{msg}");
    }
}

#[test]
fn saving_a_diverged_model_is_refused_and_keeps_the_previous_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let n = net(1);
    check_finite(&n.params()).unwrap();
    save_params(&path, &n.params()).unwrap();
    let before = std::fs::read(&path).unwrap();
    for value in [f32::INFINITY, f32::NAN, f32::NEG_INFINITY] {
        poison(&n, RUNNING_VAR, value);
        let e = save_params(&path, &n.params()).unwrap_err();
        expect_non_finite(e, RUNNING_VAR, Some("model.safetensors"));
        let e = check_finite(&n.params()).unwrap_err();
        expect_non_finite(e, RUNNING_VAR, None);
        assert_eq!(std::fs::read(&path).unwrap(), before, "the file changed");
        assert_eq!(file_names(dir.path()), ["model.safetensors"]);
    }
    // Nothing is written either when there was no file before.
    let fresh = dir.path().join("fresh.safetensors");
    assert!(save_params(&fresh, &n.params()).is_err());
    assert!(!fresh.exists());
}

#[test]
fn huge_finite_values_are_not_mistaken_for_divergence() {
    // The sum of these overflows to inf in f32; every value is finite, so the file is written.
    let dir = tempfile::tempdir().unwrap();
    let n = net(2);
    let p = n
        .params()
        .into_iter()
        .find(|p| p.name == RUNNING_VAR)
        .unwrap();
    p.var
        .set(&Tensor::full(f32::MAX, p.var.dims(), &Device::Cpu).unwrap())
        .unwrap();
    check_finite(&n.params()).unwrap();
    save_params(&dir.path().join("m.safetensors"), &n.params()).unwrap();
}

#[test]
fn saving_a_diverged_training_checkpoint_is_refused_and_keeps_the_previous_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    let t = trained(3);
    save_training_checkpoint(&path, &t).unwrap();
    let before = std::fs::read(&path).unwrap();
    poison(t.network(), RUNNING_VAR, f32::INFINITY);
    let e = save_training_checkpoint(&path, &t).unwrap_err();
    expect_non_finite(e, RUNNING_VAR, Some("checkpoint.safetensors"));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the checkpoint changed"
    );
    assert_eq!(file_names(dir.path()), ["checkpoint.safetensors"]);
}

#[test]
fn nan_in_optimizer_state_is_not_saved() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    let mut t = trained(4);
    save_training_checkpoint(&path, &t).unwrap();
    let before = std::fs::read(&path).unwrap();
    // Poison one momentum buffer of module 1 (the weights stay finite).
    let mut state: HashMap<String, Tensor> = t.optimizers()[1].state().unwrap();
    let mut keys: Vec<String> = state.keys().cloned().collect();
    keys.sort();
    let key = keys
        .into_iter()
        .find(|k| k.ends_with(".momentum_buffer"))
        .unwrap();
    let buf = &state[&key];
    let mut v = buf.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[0] = f32::NAN;
    let poisoned = Tensor::from_vec(v, buf.dims(), &Device::Cpu).unwrap();
    state.insert(key.clone(), poisoned);
    t.optimizers_mut()[1].load_state(&state).unwrap();
    check_finite(&t.network().params()).unwrap();
    let e = save_training_checkpoint(&path, &t).unwrap_err();
    expect_non_finite(e, &format!("optim/1/{key}"), Some("checkpoint.safetensors"));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the checkpoint changed"
    );
    assert_eq!(file_names(dir.path()), ["checkpoint.safetensors"]);
}

#[test]
fn a_flipped_byte_in_a_model_is_a_corrupt_file_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let a = net(5);
    save_params(&path, &a.params()).unwrap();
    flip_data_byte(&path);
    let b = net(6);
    let before = net_bits(&b);
    let e = load_params(&path, &b.params()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("corrupt"),
        "{msg}"
    );
    assert_eq!(net_bits(&b), before, "the model was changed");
}

#[test]
fn a_flipped_byte_in_a_checkpoint_is_a_corrupt_file_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    save_training_checkpoint(&path, &trained(7)).unwrap();
    flip_data_byte(&path);
    let mut b = trainer(8);
    let before = net_bits(b.network());
    let e = load_training_checkpoint(&path, &mut b).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
    assert!(
        msg.contains("checkpoint.safetensors")
            && msg.contains("corrupt")
            && msg.contains("earlier copy")
            && msg.contains("anew"),
        "{msg}"
    );
    assert_eq!(net_bits(b.network()), before, "the model was changed");
    assert_eq!(b.global_step(), 0);
}

/// Writes `net`'s tensors as another tool would: safetensors without sgr's checksum.
fn export(net: &LocalNetwork, path: &Path) {
    let map: HashMap<String, Tensor> = net
        .params()
        .into_iter()
        .map(|p| (p.name, p.var.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn files_without_a_checksum_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.safetensors");
    let a = net(9);
    export(&a, &path);
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert!(header.metadata().is_none(), "candle wrote metadata");
    let b = net(10);
    load_params(&path, &b.params()).unwrap();
    assert_eq!(net_bits(&b), net_bits(&a));
}

/// A file without a checksum (a PyTorch or timm export) with NaN or infinity in a weight is
/// refused on load, naming the tensor and the file, and the model is left as it was: it would
/// otherwise evaluate to a plausible score, or train on from garbage.
#[test]
fn non_finite_weights_are_refused_on_load() {
    let dir = tempfile::tempdir().unwrap();
    for (i, value) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
        .into_iter()
        .enumerate()
    {
        let path = dir.path().join(format!("export-{i}.safetensors"));
        let a = net(9);
        poison(&a, RUNNING_VAR, value);
        export(&a, &path);
        let b = net(10);
        let before = net_bits(&b);
        let e = load_params(&path, &b.params()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::NonFiniteInFile { .. }), "{msg}");
        assert!(
            msg.contains(RUNNING_VAR) && msg.contains("export-"),
            "{msg}"
        );
        assert_eq!(net_bits(&b), before, "nothing loaded");
    }
    // The same through a training checkpoint (`--resume`): written by another tool, say.
    let path = dir.path().join("checkpoint.safetensors");
    let t = trained(3);
    save_training_checkpoint(&path, &t).unwrap();
    let mut map = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let key = format!("model/{RUNNING_VAR}");
    let poisoned = map[&key].affine(0.0, f64::NAN).unwrap();
    map.insert(key.clone(), poisoned);
    candle_core::safetensors::save(&map, &path).unwrap();
    let mut fresh = trainer(4);
    let msg = load_training_checkpoint(&path, &mut fresh)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&key), "{msg}");
}

#[test]
fn model_round_trip_is_exact_and_carries_the_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let t = trained(11);
    save_params(&path, &t.network().params()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let sum = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(CHECKSUM_KEY))
        .expect("the checksum is in the metadata");
    assert_eq!(sum.len(), 64);
    assert!(sum.bytes().all(|b| b.is_ascii_hexdigit()));
    let b = net(12);
    assert_ne!(net_bits(&b), net_bits(t.network()));
    load_params(&path, &b.params()).unwrap();
    assert_eq!(net_bits(&b), net_bits(t.network()));
    // Saving the same tensors again writes the same bytes.
    let again = dir.path().join("again.safetensors");
    save_params(&again, &b.params()).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), bytes);
}

#[test]
fn training_checkpoint_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    let a = trained(13);
    save_training_checkpoint(&path, &a).unwrap();
    let mut b = trainer(14);
    load_training_checkpoint(&path, &mut b).unwrap();
    assert_eq!(net_bits(b.network()), net_bits(a.network()));
    assert_eq!(optim_bits(&b), optim_bits(&a));
    assert_eq!(b.state().unwrap(), a.state().unwrap());
    assert_eq!(b.global_step(), a.global_step());
}

/// A checkpoint without its checksum (written by hand, or by another program) whose trainer
/// state claims an impossible position or metric is refused on load, saying so; the trainer is
/// left as it was. Each case rewrites the state of a real checkpoint, saved without a checksum.
#[test]
fn impossible_trainer_states_are_refused_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    let t = trained(4);
    save_training_checkpoint(&path, &t).unwrap();
    let map = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&map["trainer_state_json"].to_vec1::<u8>().unwrap()).unwrap();
    let cases: [(&str, serde_json::Value); 5] = [
        ("/epoch", 1_000_000_000_000_000_000u64.into()),
        ("/epoch_progress/steps", 1_000_000.into()),
        ("/global_step", 0.into()),
        ("/epoch_progress/correct", 1_000_000_000.into()),
        ("/epoch_progress/lr", (-1.0).into()),
    ];
    for (field, value) in cases {
        let mut s = state.clone();
        *s.pointer_mut(field).unwrap() = value;
        let json = serde_json::to_vec(&s).unwrap();
        let mut m = map.clone();
        let n = json.len();
        m.insert(
            "trainer_state_json".into(),
            Tensor::from_vec(json, n, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&m, &path).unwrap();
        let mut fresh = trainer(5);
        let before = net_bits(fresh.network());
        let e = load_training_checkpoint(&path, &mut fresh)
            .err()
            .unwrap_or_else(|| panic!("{field}: accepted"))
            .to_string();
        assert!(e.contains("out of range"), "{field}: {e}");
        assert_eq!(
            net_bits(fresh.network()),
            before,
            "{field}: trainer changed"
        );
    }
}
