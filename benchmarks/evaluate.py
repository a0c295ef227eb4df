"""Zero-shot and image-text retrieval: embedpipe's metrics against clip_benchmark's loops,
on the same precomputed embeddings (planted: class centroids plus noise).

clip_benchmark is fed through a lookup "model" whose encode_image/encode_text return the
precomputed vectors, so both sides time the metric computation only. Its retrieval
builds dense texts x images score and positive matrices (DECISIONS 15: about 50 GB at
100k), so its retrieval side runs at --retrieval-images (20k) and ours at both sizes.

Usage: python benchmarks/evaluate.py [--images 100000] [--device cpu|cuda]
"""

import argparse
import time

import numpy as np
import torch
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

from embedpipe.evaluate import metrics as m

RECALL_K = (1, 5, 10)


def _accuracy(output, target, topk=(1,)):
    """clip_benchmark's accuracy() without the float(array) numpy 2.4 refuses."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]


zeroshot_classification.accuracy = _accuracy


class Lookup:
    def __init__(self, images, texts, device):
        self.images, self.texts, self.device = images.to(device), texts.to(device), device

    def tokenizer(self, numbers):
        return torch.as_tensor(numbers)

    def encode_image(self, rows):
        return self.images[rows]

    def encode_text(self, numbers):
        return self.texts[numbers]


def planted(images: int, classes: int, dim: int, templates: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, images)
    vectors = centres[labels] + 3.0 * rng.normal(size=(images, dim)).astype(np.float32)
    prompts = centres[:, None, :] + 0.5 * rng.normal(size=(classes, templates, dim)).astype(
        np.float32
    )
    captions = vectors + 4.0 * rng.normal(size=(images, dim)).astype(np.float32)
    return vectors, labels, prompts, captions


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


def ours_zeroshot(vectors, labels, prompts, device):
    images = m.as_tensor(vectors, device)
    classifier = m.zeroshot_classifier(torch.as_tensor(prompts, device=device))
    result = m.zeroshot(images, classifier, labels)
    return m.zeroshot_metrics(result["top"], result["rank"], labels, prompts.shape[0])


def theirs_zeroshot(vectors, labels, prompts, device, batch):
    classes, templates, _ = prompts.shape
    model = Lookup(
        torch.from_numpy(vectors), torch.from_numpy(prompts.reshape(-1, prompts.shape[2])), device
    )
    names = [str(c) for c in range(classes)]
    # templates as class-specific "prompts": each name maps to its rows of the text table
    per_class = {str(c): list(range(c * templates, (c + 1) * templates)) for c in range(classes)}
    dataset = torch.utils.data.TensorDataset(torch.arange(len(vectors)), torch.from_numpy(labels))
    dataset.classes = names
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    return zeroshot_classification.evaluate(
        model, loader, model.tokenizer, names, per_class, device, amp=False
    )


def ours_retrieval(vectors, captions, device):
    images, texts = m.as_tensor(vectors, device), m.as_tensor(captions, device)
    pairs = np.arange(len(vectors))
    text_ranks, image_ranks = m.text_image_ranks(texts, images, pairs, pairs)
    return m.retrieval_metrics(text_ranks, image_ranks, RECALL_K)


def theirs_retrieval(vectors, captions, device, batch):
    model = Lookup(torch.from_numpy(vectors), torch.from_numpy(captions), device)
    rows = list(range(len(vectors)))

    def collate(items):
        return torch.tensor(items), [[k] for k in items]

    loader = torch.utils.data.DataLoader(rows, batch_size=batch, collate_fn=collate)
    return zeroshot_retrieval.evaluate(
        model, loader, model.tokenizer, device, amp=False, recall_k_list=list(RECALL_K)
    )


def _close(ours: dict, theirs: dict) -> str:
    worst = max(abs(ours[k] - v) for k, v in theirs.items() if not np.isnan(v))
    return f"max |ours - clip_benchmark| = {worst:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--retrieval-images", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--templates", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1024, help="clip_benchmark's batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, dim {args.dim}")
    vectors, labels, prompts, captions = planted(
        args.images, args.classes, args.dim, args.templates
    )

    theirs, t_theirs = timed(theirs_zeroshot, vectors, labels, prompts, args.device, args.batch)
    ours, t_ours = timed(ours_zeroshot, vectors, labels, prompts, device)
    print(
        f"\nzero-shot, {args.images} images x {args.classes} classes x {args.templates} templates"
    )
    print(f"  clip_benchmark {t_theirs:8.2f} s   acc1 {theirs['acc1']:.4f}")
    print(f"  embedpipe      {t_ours:8.2f} s   acc1 {ours['acc1']:.4f}   x{t_theirs / t_ours:.1f}")
    print(f"  {_close(ours, theirs)}")

    n = args.retrieval_images
    dense = n * n * (4 + 1)
    full = args.images**2 * (4 + 1)
    print(f"\nimage-text retrieval, one caption per image, recall@{','.join(map(str, RECALL_K))}")
    print(
        f"  clip_benchmark's dense score + positive matrices: {dense / 1e9:.1f} GB at {n}, "
        f"{full / 1e9:.1f} GB at {args.images} (so it runs at {n} only)"
    )
    theirs, t_theirs = timed(theirs_retrieval, vectors[:n], captions[:n], args.device, args.batch)
    ours, t_ours = timed(ours_retrieval, vectors[:n], captions[:n], device)
    print(f"  clip_benchmark at {n:>7}: {t_theirs:8.2f} s")
    print(f"  embedpipe      at {n:>7}: {t_ours:8.2f} s   x{t_theirs / t_ours:.1f}")
    print(f"  {_close(ours, theirs)}")
    ours_full, t_full = timed(ours_retrieval, vectors, captions, device)
    print(
        f"  embedpipe      at {args.images:>7}: {t_full:8.2f} s   "
        f"image_retrieval_recall@5 {ours_full['image_retrieval_recall@5']:.4f} "
        f"(blocks of {m.BLOCK_ELEMENTS * 4 / 1e6:.0f} MB of scores)"
    )


if __name__ == "__main__":
    main()
