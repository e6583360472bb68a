"""The image pipeline over a temporary image folder: counts, labels, bad input,
determinism, host sharding, exact resumption, and the token cache."""

import hashlib
import json
import logging

import jax
import numpy as np
import PIL.Image
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mvar_jax import data, parallel
from mvar_jax.data import order, records, token_cache
from mvar_jax.data.preprocess import Preprocess, decode_rgb

CLASSES = ("cat", "dog", "fox")  # drawn red, green, blue: the label is visible in the pixels
SIZES = ((24, 20), (20, 28), (30, 24), (22, 22))


def make_split(root, split, per_class, corrupt=False):
    for c, name in enumerate(CLASSES):
        d = root / split / name
        d.mkdir(parents=True)
        for i in range(per_class):
            w, h = SIZES[i % len(SIZES)]
            arr = np.full((h, w, 3), 40, np.uint8)
            arr[..., c] = 220
            arr[:, : 2 + 2 * i] = 128  # a grey band of per-image width makes images unique
            PIL.Image.fromarray(arr).save(d / f"img{i}.jpg", quality=95)
    if corrupt:
        (root / split / "dog" / "broken.jpg").write_bytes(b"definitely not a jpeg")


@pytest.fixture
def folder(tmp_path):
    """train: 12 images + 1 corrupt; val: 6 images + 1 corrupt."""
    make_split(tmp_path, "train", 4, corrupt=True)
    make_split(tmp_path, "val", 2, corrupt=True)
    return tmp_path


@pytest.fixture
def clean_folder(tmp_path):
    make_split(tmp_path, "train", 4)
    make_split(tmp_path, "val", 2)
    return tmp_path


def folder_cfg(root, **overrides):
    cfg = data.default_config()
    cfg.update(name="folder", data_dir=str(root), image_size=16, num_classes=3, num_workers=2, prefetch=2)
    cfg.update(overrides)
    return cfg


def train(cfg, global_batch_size=4, process_index=0, process_count=1, seed=0):
    return data.build_train_source(
        cfg,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
    )


def evaluate(cfg, global_batch_size=4):
    return data.build_eval_source(cfg, global_batch_size=global_batch_size, process_index=0, process_count=1)


def colour_class(images):
    """The class each image was drawn as: its dominant channel."""
    return images.mean(axis=(1, 2)).argmax(-1)


def digest(image):
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def take(source, n):
    return [next(source) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# --- counts, labels, bad images -------------------------------------------------


def test_eval_pass_counts_examples_and_reports_the_corrupt_one(folder, caplog):
    source = evaluate(folder_cfg(folder))
    with caplog.at_level(logging.WARNING):
        batches = list(source)
    assert source.num_examples == 7 and source.num_batches == 2 and len(batches) == 2
    batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32
    # In sorted order: cat x2, dog/broken.jpg, dog x2, fox x2, then one padding slot.
    np.testing.assert_array_equal(batch["mask"], [1, 1, 0, 1, 1, 1, 1, 0])
    valid = batch["mask"]
    np.testing.assert_array_equal(batch["label"][valid], [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(colour_class(batch["image"][valid]), batch["label"][valid])
    assert not batch["image"][~valid].any()  # unreadable and padding slots stay zero
    assert source.num_bad_records == 1
    assert "broken.jpg" in caplog.text
    with pytest.raises(StopIteration):
        next(source)


def test_train_epoch_has_every_readable_image_once(folder, caplog):
    source = train(folder_cfg(folder, hflip=True))
    with caplog.at_level(logging.WARNING):
        batches = take(source, 3)  # 12 readable images = one epoch
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert images.shape == (12, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [4, 4, 4])
    np.testing.assert_array_equal(colour_class(images), labels)
    state = source.get_state()
    consumed = state["epoch"] * 13 + state["position"]
    assert consumed == 12 + state["num_bad_records"]
    while source.num_bad_records == 0:
        next(source)
    assert "broken.jpg" in caplog.text


def test_on_bad_image_raise_names_the_file(folder):
    source = evaluate(folder_cfg(folder, on_bad_image="raise"))
    with pytest.raises(data.BadImageError, match="broken.jpg"):
        list(source)


@pytest.mark.parametrize(
    "breakage, error, match",
    [
        ("no_classes", FileNotFoundError, "no class sub-folders"),
        ("no_val", FileNotFoundError, "does not exist"),
        ("empty_class", FileNotFoundError, "without images.*zebra"),
        ("num_classes", ValueError, "num_classes=5 but folder"),
        ("name", ValueError, "data.name='nope'"),
        ("policy", ValueError, "on_bad_image='ignore'"),
    ],
)
def test_bad_input_gives_a_clear_error(tmp_path, breakage, error, match):
    if breakage == "no_classes":
        (tmp_path / "val").mkdir()
    else:
        make_split(tmp_path, "val", 1)
    if breakage == "empty_class":
        (tmp_path / "val" / "zebra").mkdir()
    if breakage == "no_val":
        (tmp_path / "val").rename(tmp_path / "valid")
    overrides = {
        "num_classes": {"num_classes": 5},
        "name": {"name": "nope"},
        "policy": {"on_bad_image": "ignore"},
    }.get(breakage, {})
    with pytest.raises(error, match=match):
        evaluate(folder_cfg(tmp_path, **overrides))


def test_batch_size_and_state_are_checked(clean_folder):
    cfg = folder_cfg(clean_folder)
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        train(cfg, global_batch_size=4, process_count=3)
    source = train(cfg)
    with pytest.raises(ValueError, match="num_bad_records"):
        source.set_state({"epoch": 0, "position": 0})
    with pytest.raises(ValueError, match="past the epoch"):
        source.set_state({"epoch": 0, "position": 12, "num_bad_records": 0})


# --- determinism and sharding ----------------------------------------------------


def test_same_seed_same_batches_whatever_the_threads(folder):
    cfg = dict(hflip=True, crop="resize_random_crop")
    serial = take(train(folder_cfg(folder, num_workers=0, prefetch=0, **cfg), seed=7), 5)
    threaded = take(train(folder_cfg(folder, num_workers=3, prefetch=3, **cfg), seed=7), 5)
    assert_batches_equal(serial, threaded)
    other = take(train(folder_cfg(folder, **cfg), seed=8), 5)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(serial, other, strict=True))


def test_two_hosts_get_disjoint_shards_that_cover_the_data(clean_folder):
    # ADM crop without flip maps each example to one fixed image, so digests identify it.
    cfg = folder_cfg(clean_folder, crop="adm_center_crop")
    recs = records.open_image_records(cfg, "train")
    prep = Preprocess.from_config(cfg)
    everything = {digest(prep(decode_rgb(recs.read(i)[0]), None)) for i in range(len(recs))}
    shards = []
    for host in range(2):
        batches = take(train(cfg, global_batch_size=4, process_index=host, process_count=2), 3)
        assert all(b["image"].shape[0] == 2 for b in batches)
        shards.append({digest(img) for b in batches for img in b["image"]})
    assert len(shards[0]) == len(shards[1]) == 6
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == everything


@pytest.mark.parametrize("num_records, hosts", [(10, 3), (7, 1), (5, 5)])
def test_order_shards_partition_each_epoch(num_records, hosts):
    for epoch in range(2):
        shards = [order.ShuffledEpochs(num_records, 3, h, hosts).host_indices(epoch) for h in range(hosts)]
        flat = np.concatenate(shards)
        assert all(len(s) == num_records // hosts for s in shards)
        assert len(set(flat.tolist())) == len(flat) and flat.max() < num_records
    single = order.ShuffledEpochs(num_records, 3)
    assert not np.array_equal(single.host_indices(0), single.host_indices(1)) or num_records < 3
    passes = [list(order.SinglePass(num_records, 2, h, hosts).slots({"position": 0})) for h in range(hosts)]
    assert len({len(p) for p in passes}) == 1  # hosts stay in step
    indices = [s.index for p in passes for s in p if s.index is not None]
    assert sorted(indices) == list(range(num_records))


# --- resumption -------------------------------------------------------------------


def test_restored_source_continues_with_the_next_unseen_batch(folder):
    cfg = folder_cfg(folder, hflip=True)
    source = train(cfg, global_batch_size=5)
    take(source, 4)  # 20 examples: into the second epoch, past the corrupt file
    state = json.loads(json.dumps(source.get_state()))
    expected = take(source, 3)
    source.close()

    fresh = train(cfg, global_batch_size=5)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)
    assert fresh.num_bad_records == source.num_bad_records


def test_eval_source_resumes_mid_pass_and_resets(folder):
    source = evaluate(folder_cfg(folder), global_batch_size=2)
    first = take(source, 2)
    state = source.get_state()
    rest = list(source)
    fresh = evaluate(folder_cfg(folder), global_batch_size=2)
    fresh.set_state(state)
    assert_batches_equal(list(fresh), rest)
    fresh.reset()
    assert_batches_equal(take(fresh, 2), first)


def test_device_prefetch_reports_the_state_of_the_batch_it_returned(clean_folder):
    cfg = folder_cfg(clean_folder, hflip=True)
    plain = train(cfg)
    expected = take(plain, 3)
    state_after_2 = train(cfg)
    take(state_after_2, 2)

    sharding = parallel.batch_sharding(parallel.make_mesh())
    prefetched = data.DevicePrefetch(train(cfg), sharding, size=2)
    got = [jax.device_get(b) for b in take(prefetched, 2)]
    assert_batches_equal(got, expected[:2])
    assert prefetched.get_state() == state_after_2.get_state()

    resumed = data.DevicePrefetch(train(cfg), NamedSharding(sharding.mesh, PartitionSpec("data")))
    resumed.set_state(prefetched.get_state())
    assert_batches_equal([jax.device_get(next(resumed))], expected[2:])


# --- token cache ------------------------------------------------------------------


def fake_encode(img_BHW3):
    """A deterministic stand-in tokenizer: quantised 4x4 patch means (flip-sensitive)."""
    assert img_BHW3.dtype == np.uint8
    b, s = img_BHW3.shape[:2]
    patches = np.asarray(img_BHW3).reshape(b, 4, s // 4, 4, s // 4, 3).mean(axis=(2, 4))
    return np.floor(patches * (100 / 255)).astype(np.int32).reshape(b, -1)


def direct_tokens(cfg, role):
    """Ids computed without the cache: decode, eval-preprocess, encode (and flipped)."""
    recs = records.open_image_records(cfg, role)
    prep = Preprocess.from_config(cfg)
    out = []
    for i in range(len(recs)):
        try:
            img = prep(decode_rgb(recs.read(i)[0]), None)[None]
        except data.BadImageError:
            out.append(None)
            continue
        out.append((fake_encode(img)[0], fake_encode(img[:, :, ::-1])[0], recs.read(i)[1]))
    return out


@pytest.fixture
def cached(folder):
    cfg = folder_cfg(folder)
    for role in ("train", "eval"):
        data.write_token_cache(cfg, fake_encode, folder / "tokens", role, batch_size=4, chunk_size=5)
    return folder, folder_cfg(folder, token_cache_dir=str(folder / "tokens"))


def test_cache_round_trip_equals_direct_encoding(cached):
    folder, cfg = cached
    cache = data.TokenCache(cfg.token_cache_dir, "train")
    expected = direct_tokens(cfg, "train")
    assert len(cache) == len(expected) == 13 and cache.seq_len == 48
    for i, exp in enumerate(expected):
        ids, label = cache.read(i)
        if exp is None:
            assert label == -1
        else:
            np.testing.assert_array_equal(ids, np.stack(exp[:2]))
            assert label == exp[2]

    # Eval batches: in order, un-flipped, unreadable and padding masked out.
    batches = list(evaluate(cfg))
    valid = [e for e in direct_tokens(cfg, "eval") if e is not None]
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches])[mask], [e[0] for e in valid])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask], [e[2] for e in valid])


@pytest.mark.parametrize("hflip", [False, True])
def test_cached_training_batches_pick_the_image_or_its_flip(cached, hflip):
    _, cfg = cached
    cfg.hflip = hflip
    expected = [e for e in direct_tokens(cfg, "train") if e is not None]
    plain = {digest(e[0]): e[2] for e in expected}
    flipped = {digest(e[1]): e[2] for e in expected}
    source = train(cfg)
    batches = take(source, 6)  # two epochs of the 12 readable images
    picked = {"plain": 0, "flipped": 0}
    for b in batches:
        assert b["tokens"].shape == (4, 48) and b["tokens"].dtype == np.int32
        for ids, label in zip(b["tokens"], b["label"], strict=True):
            kind = "plain" if digest(ids) in plain else "flipped"
            assert {"plain": plain, "flipped": flipped}[kind].get(digest(ids)) == label
            picked[kind] += 1
    assert (picked["flipped"] > 0) == hflip and picked["plain"] > 0
    # Same machinery as images: restoring the state replays the next batch.
    again = train(cfg)
    again.set_state(json.loads(json.dumps(source.get_state())))
    assert_batches_equal([next(again)], [next(source)])


def test_cache_resumes_an_interrupted_write_and_checks_what_it_reads(cached):
    folder, cfg = cached
    tokens_path = folder / "tokens" / "train" / "chunk-000001.tokens.npy"
    before = np.load(tokens_path)
    tokens_path.unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        data.TokenCache(cfg.token_cache_dir, "train")

    calls = []

    def counting_encode(img):
        calls.append(len(img))
        return fake_encode(img)

    data.write_token_cache(
        folder_cfg(folder), counting_encode, folder / "tokens", "train", batch_size=4, chunk_size=5
    )
    assert calls == [4, 4, 4, 4]  # only the 5 examples of chunk 1, and their flips
    np.testing.assert_array_equal(np.load(tokens_path), before)

    with pytest.raises(ValueError, match="already holds a different cache"):
        data.write_token_cache(folder_cfg(folder, image_size=8), fake_encode, folder / "tokens", "train")
    with pytest.raises(ValueError, match="image_size=16, but data.image_size=8"):
        train(folder_cfg(folder, image_size=8, token_cache_dir=cfg.token_cache_dir))
    with pytest.raises(ValueError, match=r"integer ids \(B=4, L\)"):
        data.write_token_cache(folder_cfg(folder), lambda x: x, folder / "other", "eval", batch_size=4)


def test_sharded_encoder_matches_the_plain_function():
    def tokenize(scale, img):
        return (
            jax.numpy.floor((img[:, ::4, ::4, 0] + 1) * scale)
            .astype(jax.numpy.int32)
            .reshape(img.shape[0], -1)
        )

    img = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    encode = data.sharded_encoder(tokenize, np.float32(50.0))
    np.testing.assert_array_equal(encode(img), np.asarray(tokenize(50.0, img)))


def test_cache_with_the_official_tiny_vqvae(fixture_dir, tmp_path):
    pytest.importorskip("mvar_jax.models.vqvae")
    weights = pytest.importorskip("mvar_jax.weights.vqvae")
    vae_config, variables = weights.load_official_vqvae(fixture_dir / "tiny_vae.pth", patch_nums=(1, 2, 3, 4))
    from mvar_jax.models.vqvae import VQVAE

    make_split(tmp_path, "train", 1)  # 3 images, one encoder batch
    cfg = folder_cfg(tmp_path, image_size=64, crop="adm_center_crop")
    encode = data.sharded_encoder(token_cache.vqvae_tokenize(VQVAE(vae_config)), variables)
    data.write_token_cache(cfg, encode, tmp_path / "tok", "train", batch_size=3)

    recs = records.open_image_records(cfg, "train")
    prep = Preprocess.from_config(cfg)
    img = np.stack([prep(decode_rgb(recs.read(i)[0]), None) for i in range(len(recs))])
    cache = data.TokenCache(tmp_path / "tok", "train")
    assert cache.seq_len == 1 + 4 + 9 + 16
    np.testing.assert_array_equal(
        np.stack([cache.read(i)[0] for i in range(3)]),
        np.stack([encode(img), encode(img[:, :, ::-1])], 1),
    )
