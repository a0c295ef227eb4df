"""One rank of the two-process loss tests (gloo on CPU), and open_clip's loss module.

Run as ``python losses_dist_worker.py RANK WORLD_SIZE RENDEZVOUS_FILE INPUTS OUTPUT``: it takes
its rank's rows of the full batch in INPUTS, computes every case of ``CASES`` with our losses and
open_clip's, and saves each loss value and the gradients of its own features to OUTPUT.
"""

from __future__ import annotations

import gc
import importlib.util
import pathlib
import sys
from types import ModuleType

import torch


def open_clip_loss_module() -> ModuleType:
    """open_clip's loss.py alone: importing the open_clip package also loads timm and
    transformers (seconds per process); loss.py itself needs only torch."""
    package = importlib.util.find_spec("open_clip")
    path = pathlib.Path(package.submodule_search_locations[0]) / "loss.py"
    spec = importlib.util.spec_from_file_location("open_clip_loss_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# name -> (our loss and options, open_clip's class and options or None)
CASES = {
    "infonce": (("infonce", {}), ("ClipLoss", {})),
    "infonce_local": (("infonce", {"local_loss": True}), ("ClipLoss", {"local_loss": True})),
    "infonce_with_grad": (
        ("infonce", {"gather_with_grad": True}),
        ("ClipLoss", {"gather_with_grad": True}),
    ),
    "infonce_local_with_grad": (
        ("infonce", {"local_loss": True, "gather_with_grad": True}),
        ("ClipLoss", {"local_loss": True, "gather_with_grad": True}),
    ),
    "pairwise_sigmoid": (("pairwise_sigmoid", {}), ("SigLipLoss", {})),
    "upwtdpos_weight_1": (("pairwise_sigmoid_upwtdpos", {"pos_weight": 1.0}), ("SigLipLoss", {})),
    "multipos": (("multipos_sigmoid", {"pos_weight": 2.0}), None),
    "multipos_global": (
        ("multipos_sigmoid", {"pos_weight": 2.0, "local_loss": False, "gather_with_grad": False}),
        None,
    ),
}


def _run(loss, image, text, scale, bias, labels):
    image = image.clone().requires_grad_(True)
    text = text.clone().requires_grad_(True)
    value = loss(image, text, scale, bias, **({} if labels is None else {"labels": labels}))
    value.backward()
    return {"loss": value.detach(), "image_grad": image.grad, "text_grad": text.grad}


def run_cases(rank: int, world_size: int, inputs: dict) -> dict:
    from embedpipe.train.losses import get_loss

    reference = open_clip_loss_module()
    rows = slice(rank * inputs["per_rank"], (rank + 1) * inputs["per_rank"])
    image, text, labels = inputs["image"][rows], inputs["text"][rows], inputs["labels"][rows]
    scale, bias = inputs["scale"], inputs["bias"]
    distributed = {"rank": rank, "world_size": world_size}
    results = {}
    for case, ((name, options), open_clip_case) in CASES.items():
        ours = get_loss(name, **options, **distributed)
        case_bias = None if name == "infonce" else bias
        case_labels = labels if name == "multipos_sigmoid" else None
        results[case] = _run(ours, image, text, scale, case_bias, case_labels)
        if open_clip_case is not None:
            class_name, reference_options = open_clip_case
            theirs = getattr(reference, class_name)(**reference_options, **distributed)
            results[f"{case}/open_clip"] = _run(theirs, image, text, scale, case_bias, None)
    return results


def main() -> None:
    rank, world_size = int(sys.argv[1]), int(sys.argv[2])
    rendezvous, inputs_path, output_path = sys.argv[3:6]
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
    )
    results = run_cases(rank, world_size, torch.load(inputs_path, weights_only=True))
    torch.save(results, output_path)
    # open_clip's collectives (torch.distributed.nn autograd functions, P2P exchanges) leave
    # the process group referenced from reference cycles. Left to interpreter shutdown, the
    # group's gloo threads are destroyed still joinable and the process aborts ("terminate
    # called without an active exception") in about half the runs; collect them, and let both
    # ranks finish before either closes its connections.
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
