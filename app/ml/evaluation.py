"""Quality metrics of a generator against real data, written to the model's `card.json`.

All feature-space metrics use the penultimate layer of a small CNN trained on the real training split (the
evaluator, shipped with the model as `evaluator.safetensors`).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from app.core.checkpoint import save_features, utc_now
from app.core.device import resolve_device
from app.core.images import image_grid, to_model_range
from app.core.label_filter import load_label_filter
from app.core.model import NEIGHBOURS_FILE, load_model
from app.core.nets import Classifier, ClassifierConfig
from app.core.png import encode_png
from app.core.sampling import per_class_labels, sample
from app.errors import DataError
from app.ml.card import update_card
from app.ml.datasets import ImageDataset, load_dataset, load_training_data, split_as_trained

MAX_SHIPPED_FEATURES = 20_000


def classifier_steps(n_images: int, epochs: int, batch_size: int = 128) -> int:
    """The optimizer steps `train_classifier` takes for `epochs` over `n_images` (full batches; at least one)."""
    return epochs * max(1, n_images // max(1, min(batch_size, n_images)))


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int = 8, seed: int = 0,
                     device: torch.device | str = "cpu", batch_size: int = 128, progress: bool = False,
                     steps: int | None = None) -> Classifier:
    """Train the small CNN on uint8 `[N, H, W, C]` images with Adam for `epochs` (or exactly `steps` optimizer
    steps, to compare arms at matched steps); deterministic for a seed on CPU."""
    if not len(images):
        raise DataError("the classifier has no images to train on")
    torch.manual_seed(seed)
    _, h, w, c = images.shape
    model = Classifier(ClassifierConfig(h, w, c, num_classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch_size = max(1, min(batch_size, len(images)))  # fewer images than a batch: one batch of all, not no steps
    steps = steps or classifier_steps(len(images), epochs, batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    x, y = to_model_range(images).to(device), torch.from_numpy(labels.astype(np.int64)).to(device)
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    done = 0
    with tqdm(total=steps, desc="classifier", disable=not progress, leave=False) as bar:
        while done < steps:
            order = torch.randperm(len(x), generator=shuffle).to(device)
            for start in range(0, len(x) - batch_size + 1, batch_size):
                if done == steps:
                    break
                batch = order[start : start + batch_size]
                loss = F.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                done += 1
                bar.update()
    return model.eval().requires_grad_(False)


@torch.inference_mode()
def predict(model: Classifier, images: np.ndarray, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(class probabilities `[N, K]`, features `[N, D]`) of uint8 images."""
    device = next(model.parameters()).device
    probs, feats = [], []
    for start in range(0, len(images), batch_size):
        x = to_model_range(images[start : start + batch_size]).to(device)
        f = model.features(x)
        feats.append(f.float().cpu())
        probs.append(model.head(f).softmax(dim=1).float().cpu())
    return torch.cat(probs), torch.cat(feats)


def accuracy(model: Classifier, images: np.ndarray, labels: np.ndarray) -> float:
    probs, _ = predict(model, images)
    return float((probs.argmax(dim=1).numpy() == labels).mean())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets `[N, D]`."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    sqrt_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    trace_sqrt = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * trace_sqrt)


def _nearest(query: torch.Tensor, reference: torch.Tensor, k: int = 1, exclude_self: bool = False) -> torch.Tensor:
    """Distance from each query row to its k-th nearest reference row (chunked to bound memory)."""
    out = []
    for start in range(0, len(query), 2048):
        d = torch.cdist(query[start : start + 2048], reference)
        if exclude_self:
            d[torch.arange(len(d)), torch.arange(start, start + len(d))] = float("inf")
        out.append(d.kthvalue(k, dim=1).values)
    return torch.cat(out)


def _coverage(query: torch.Tensor, reference: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of query rows inside at least one reference ball."""
    inside = []
    for start in range(0, len(query), 2048):
        d = torch.cdist(query[start : start + 2048], reference)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).float().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN manifolds."""
    real_radii = _nearest(real, real, k + 1)  # the nearest is the point itself
    fake_radii = _nearest(fake, fake, k + 1)
    return _coverage(fake, real, real_radii), _coverage(real, fake, fake_radii)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al., 2020): how many real k-NN balls a sample falls in (≈ 1 when samples are
    as dense as real data), and the share of real balls holding at least one sample (robust against outliers)."""
    radii = _nearest(real, real, k + 1)
    counts = torch.zeros(len(fake))
    covered = torch.zeros(len(real), dtype=torch.bool)
    for start in range(0, len(fake), 2048):
        inside = torch.cdist(fake[start : start + 2048], real) <= radii[None, :]
        counts[start : start + len(inside)] = inside.sum(dim=1).float()
        covered |= inside.any(dim=0)
    return float(counts.sum() / (k * len(fake))), float(covered.float().mean())


def manifold_metrics(real: torch.Tensor, fake: torch.Tensor, seed: int = 0, n: int = 5000) -> dict[str, float]:
    """Precision, recall, density and coverage on random subsets of `n` rows of each side (the k-NN radii grow with
    fewer rows, so both sides get as many). Random, not a prefix: samples and datasets come in class order."""
    rows = torch.Generator().manual_seed(seed)
    n = min(n, len(real), len(fake))
    real, fake = (side[torch.randperm(len(side), generator=rows)[:n]] for side in (real, fake))
    precision, recall = precision_recall(real, fake)
    density, coverage = density_coverage(real, fake)
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage, "n": n}


def temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature that minimises the negative log-likelihood of held-out labels (Guo et al., 2017)."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """|accuracy − confidence| averaged over equal-width confidence bins, weighted by their share of samples."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in itertools.pairwise(edges.tolist()):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            error += float(in_bin.float().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs())
    return error


def memorisation_threshold(train: torch.Tensor, percentile: float = 1.0) -> float:
    """The `percentile`-th percentile of real-to-real nearest-neighbour distances within the training features."""
    return float(np.percentile(_nearest(train, train, exclude_self=True).numpy(), percentile))


def memorisation_rate(train: torch.Tensor, samples: torch.Tensor, threshold: float) -> float:
    """Share of samples whose nearest training image is closer than the threshold."""
    return float((_nearest(samples, train) < threshold).float().mean())


def sliced_wasserstein(real: np.ndarray, fake: np.ndarray, projections: int = 128, seed: int = 0) -> float:
    """Mean 1-Wasserstein distance of pixel vectors (in [0, 1]) along random unit directions, via 100 quantiles."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.from_numpy(real.reshape(len(real), -1)).float() / 255.0
    b = torch.from_numpy(fake.reshape(len(fake), -1)).float() / 255.0
    directions = F.normalize(torch.randn(a.shape[1], projections, generator=gen), dim=0)
    levels = torch.linspace(0, 1, 100)
    qa, qb = torch.quantile(a @ directions, levels, dim=0), torch.quantile(b @ directions, levels, dim=0)
    return float((qa - qb).abs().mean())


def evaluate(folder: Path, data_spec: str, test_spec: str | None = None, per_class: int = 1000, seed: int = 0,
             device: str = "auto", progress: bool = True, classifier_epochs: int = 8,
             val_spec: str | None = None) -> dict[str, Any]:
    """Evaluate a model against real data (split as in training; `val_spec` stands in for its recorded --val-data);
    writes the evaluator and the metrics into its folder, returns the card."""
    started = time.perf_counter()
    dev = resolve_device(device)
    model = load_model(folder, dev, label_filter=False)  # its filter, if any, samples through the evaluator below
    training_data = model.config["training_data"]
    dataset = load_training_data(data_spec, model.class_names, training_data.get("fingerprint"))
    train_set, val_set = split_as_trained(dataset, training_data, val_spec)
    k = model.num_classes
    evaluator = train_classifier(train_set.images, train_set.labels, k, classifier_epochs, seed, dev, progress=progress)
    real_steps = classifier_steps(len(train_set), classifier_epochs)
    real_val_accuracy = accuracy(evaluator, val_set.images, val_set.labels)
    calibration = calibrate(evaluator, val_set, seed)
    _, real_feats = predict(evaluator, train_set.images)
    # the shipped features (the max_similarity filter's reference) hold at most MAX_SHIPPED_FEATURES rows, so a
    # model folder stays small; the threshold is computed on the same rows
    kept = torch.randperm(len(real_feats), generator=torch.Generator().manual_seed(seed))[:MAX_SHIPPED_FEATURES]
    shipped = real_feats[kept.sort().values]
    threshold = memorisation_threshold(shipped)
    evaluator.save_pretrained(folder, trained_on=data_spec, val_accuracy=round(real_val_accuracy, 4),
                              memorisation_threshold=threshold, reference_rows=len(shipped),
                              temperature=calibration["temperature"])
    save_features(folder, shipped)
    model.label_filter = load_label_filter(folder, model.config, k, model.image_shape, dev)

    synthetic = ImageDataset(*sample(model, seed, per_class_labels(k, per_class)), model.class_names)
    _, val_feats = predict(evaluator, val_set.images)
    synth_probs, synth_feats = predict(evaluator, synthetic.images)
    read_probs = synth_probs
    if model.label_filter:  # the filter's evaluator would read every kept sample as its label: another seed reads them
        reader = train_classifier(train_set.images, train_set.labels, k, classifier_epochs, seed + 1, dev,
                                  progress=progress)
        read_probs = predict(reader, synthetic.images)[0]
    manifold = manifold_metrics(real_feats, synth_feats, seed)
    # TSTR at the real arm's steps, and the augmentation gain against real data at the augmented arm's steps: a
    # classifier that merely trained longer does not count as a gain
    tstr = train_classifier(synthetic.images, synthetic.labels, k, seed=seed, device=dev, progress=progress,
                            steps=real_steps)
    mixed = np.concatenate([train_set.images, synthetic.images]), np.concatenate([train_set.labels, synthetic.labels])
    mixed_steps = classifier_steps(len(mixed[0]), classifier_epochs)
    augmented = train_classifier(*mixed, k, seed=seed, device=dev, progress=progress, steps=mixed_steps)
    real_matched = train_classifier(train_set.images, train_set.labels, k, seed=seed, device=dev, progress=progress,
                                    steps=mixed_steps)
    augmented_accuracy = accuracy(augmented, val_set.images, val_set.labels)
    real_matched_accuracy = accuracy(real_matched, val_set.images, val_set.labels)
    # estimates at the validation split's size: the real reference ("_real_val") is only comparable at equal n,
    # since both distances are biased upwards for fewer images
    rows = torch.Generator().manual_seed(seed)
    at_val_n = [torch.randperm(len(synth_feats), generator=rows)[: len(val_feats)] for _ in range(5)]
    metrics = {
        "frechet_distance": frechet_distance(real_feats, synth_feats),
        "frechet_distance_at_val_n": float(np.mean([frechet_distance(real_feats, synth_feats[i]) for i in at_val_n])),
        "frechet_distance_real_val": frechet_distance(real_feats, val_feats),
        "precision": manifold["precision"],
        "recall": manifold["recall"],
        "label_agreement": float((read_probs.argmax(1).numpy() == synthetic.labels).mean()),
        "memorisation_rate": memorisation_rate(shipped, synth_feats, threshold),
        "memorisation_rate_real_val": memorisation_rate(shipped, val_feats, threshold),
        "memorisation_threshold": threshold,
        "sliced_wasserstein": sliced_wasserstein(train_set.images, synthetic.images, seed=seed),
        "sliced_wasserstein_at_val_n": float(np.mean([sliced_wasserstein(train_set.images,
                                                                         synthetic.images[i.numpy()], seed=seed)
                                                      for i in at_val_n])),
        "sliced_wasserstein_real_val": sliced_wasserstein(train_set.images, val_set.images, seed=seed),
        "tstr_accuracy": accuracy(tstr, val_set.images, val_set.labels),
        "real_accuracy": real_val_accuracy,
        "augmented_accuracy": augmented_accuracy,
        "real_matched_accuracy": real_matched_accuracy,
        "augmentation_gain": augmented_accuracy - real_matched_accuracy,
        "density": manifold["density"],
        "coverage": manifold["coverage"],
    }
    sections: dict[str, Any] = {}
    if test_spec:
        test = load_dataset(test_spec).aligned_to(model.class_names)
        sections["test_metrics"] = {
            "data": test_spec, "n": len(test),
            "tstr_accuracy": round(accuracy(tstr, test.images, test.labels), 6),
            "real_accuracy": round(accuracy(evaluator, test.images, test.labels), 6),
            "augmented_accuracy": round(accuracy(augmented, test.images, test.labels), 6),
            "real_matched_accuracy": round(accuracy(real_matched, test.images, test.labels), 6),
        }
    sections["per_class"] = _per_class(model.class_names, tstr, val_set, real_feats, train_set.labels, synthetic,
                                       synth_feats, read_probs)
    sections["privacy"] = _privacy(train_set, real_feats, val_feats, synthetic, synth_feats, seed)
    _write_neighbours(folder / NEIGHBOURS_FILE, train_set, real_feats, synthetic, synth_feats)
    sections["calibration"] = calibration
    return update_card(folder, **sections, metrics={key: round(value, 6) for key, value in metrics.items()},
                       evaluation={
                           "data": data_spec,  # load_training_data refused data other than what it was trained on
                           "data_fingerprint": training_data.get("fingerprint") or dataset.fingerprint(),
                           "data_matches_training": training_data.get("fingerprint") is not None,
                           "n_real_train": len(train_set), "n_real_val": len(val_set), "n_synthetic": len(synthetic),
                           "n_manifold": int(manifold["n"]),
                           "classifier_steps": {"real": real_steps, "tstr": real_steps, "augmented": mixed_steps,
                                                "real_matched": mixed_steps},
                           "seed": seed, "latent_scale": model.net.cfg.latent_scale,
                           "label_filter": model.config.get("label_filter"),
                           "label_agreement_by": f"a classifier of seed {seed + 1} (not the filter's evaluator)"
                                                 if model.label_filter else "the evaluator",
                           "feature_space": "evaluator penultimate layer",
                           "classifier_epochs": classifier_epochs, "evaluated_at": utc_now(), "device": str(dev),
                           "seconds": round(time.perf_counter() - started, 1)})


def calibrate(evaluator: Classifier, val_set: ImageDataset, seed: int) -> dict[str, float]:
    """Temperature scaling of the evaluator: fitted on one half of the validation split, its expected calibration
    error measured on the other half, so that `min_confidence` reads as a probability."""
    probs, _ = predict(evaluator, val_set.images)
    labels = torch.from_numpy(val_set.labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    fit, check = order[: len(order) // 2], order[len(order) // 2 :]
    logits = probs.clamp_min(1e-12).log()
    fitted = temperature(logits[fit], labels[fit])
    before = expected_calibration_error(probs[check], labels[check])
    after = expected_calibration_error((logits[check] / fitted).softmax(1), labels[check])
    # a temperature that does not calibrate the held-out half better (a few errors on a small split decide the fit)
    # is not shipped: 1 keeps the evaluator's own probabilities
    t = fitted if after < before else 1.0
    return {"temperature": round(t, 4), "fitted_temperature": round(fitted, 4), "ece_before": round(before, 5),
            "ece_after": round(min(after, before), 5), "n_fit": len(fit), "n_check": len(check)}


def _per_class(names: list[str], tstr: Classifier, val_set: ImageDataset, real_feats: torch.Tensor,
               real_labels: np.ndarray, synthetic: ImageDataset, synth_feats: torch.Tensor,
               synth_probs: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per class: TSTR recall on the validation split, Fréchet distance of its samples to its real images, and how
    often the evaluator reads the asked-for class, so that a weak class shows."""
    predicted, _ = predict(tstr, val_set.images)
    predicted_labels = predicted.argmax(1).numpy()
    agreement = synth_probs.argmax(1).numpy() == synthetic.labels
    out = {}
    for label, name in enumerate(names):
        in_val, in_real, in_synth = val_set.labels == label, real_labels == label, synthetic.labels == label
        out[name] = {
            "tstr_recall": round(float((predicted_labels[in_val] == label).mean()), 4) if in_val.any() else None,
            "frechet_distance": round(frechet_distance(real_feats[torch.from_numpy(in_real)][:2000],
                                                       synth_feats[torch.from_numpy(in_synth)][:2000]), 3),
            "label_agreement": round(float(agreement[in_synth].mean()), 4)}
    return out


def _privacy(train_set: ImageDataset, real_feats: torch.Tensor, val_feats: torch.Tensor, synthetic: ImageDataset,
             synth_feats: torch.Tensor, seed: int) -> dict[str, float | int]:
    """Distance to closest record: the share of samples nearer to a training image than to any held-out real image,
    with as many training images as held-out ones (≈ 50 % when the model does not memorise); and samples that are
    pixel-identical to a training image."""
    gen = torch.Generator().manual_seed(seed)
    train_rows = torch.randperm(len(real_feats), generator=gen)[: len(val_feats)]
    samples = synth_feats[torch.randperm(len(synth_feats), generator=gen)[:2000]]
    to_train, to_holdout = _nearest(samples, real_feats[train_rows]), _nearest(samples, val_feats)
    training_images = {image.tobytes() for image in train_set.images}
    identical = sum(image.tobytes() in training_images for image in synthetic.images)
    return {"dcr_share_closer_to_train": round(float((to_train < to_holdout).float().mean()), 4),
            "n_samples": len(samples), "n_reference": len(val_feats), "identical_to_training": identical}


def _write_neighbours(path: Path, train_set: ImageDataset, real_feats: torch.Tensor, synthetic: ImageDataset,
                      synth_feats: torch.Tensor, per_class: int = 2) -> None:
    """For the memorisation check by eye: per class, the samples closest to a training image (row-wise: sample,
    its nearest training image)."""
    pairs = []
    for label in range(len(synthetic.class_names)):
        rows = np.flatnonzero(synthetic.labels == label)
        if not len(rows):
            continue
        distances = torch.cdist(synth_feats[rows], real_feats)
        nearest_distance, nearest = distances.min(dim=1)
        for i in nearest_distance.argsort()[:per_class].tolist():
            pairs += [synthetic.images[rows[i]], train_set.images[int(nearest[i])]]
    if pairs:
        path.write_bytes(encode_png(image_grid(np.stack(pairs), columns=2 * per_class, scale=2)))
