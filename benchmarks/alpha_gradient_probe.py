"""Alpha-gradient size per slot of a Table 3 search checkpoint, against the pull of alpha's weight decay.

    python benchmarks/alpha_gradient_probe.py runs/fashion_mnist_56px/searches/pmpl_b/last.pth

Loads the supernet of a `train_hooks.search` checkpoint (slots already fixed stay open, at their start), takes the
first-order gradient of the cross-entropy with respect to every slot's alpha on a few test-split batches in train
mode, and prints per slot the mean over candidates of |mean gradient|, of its per-batch spread, and of |alpha| x 1e-3
(the term Adam's weight decay adds). Adam balances the two where |alpha| = |mean gradient| / weight decay
(docs/results_fashion_mnist.md, the searches).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
import timm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table3 import data, plan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint')
    parser.add_argument('--batches', type=int, default=12)
    parser.add_argument('--weight-decay', type=float, default=1e-3)
    parser.add_argument('--work-dir', default=os.path.join(plan.REPO_DIR, 'runs', 'fashion_mnist_56px'))
    args = parser.parse_args()
    torch.set_num_threads(1)
    saved = torch.load(args.checkpoint, map_location='cpu', weights_only=False)
    model = timm.create_model(plan.RECIPE.model, num_classes=10, in_chans=1,
                              output_stride=plan.RECIPE.output_stride)
    state = {k: v for k, v in saved['state_dict'].items() if k != 'metapool_genotype'}
    model.load_state_dict(state, strict=False)  # fixed slots are absent from the state and stay open
    alphas = list(model.arch_parameters())
    _, test_loader = data.make_loaders(data.prepare_data(os.path.join(args.work_dir, 'data')))
    model.train()
    grads = []
    for i, (images, targets) in enumerate(test_loader):
        if i == args.batches:
            break
        loss = F.cross_entropy(model(images), targets)
        grads.append(torch.stack(torch.autograd.grad(loss, alphas)))
    grads = torch.stack(grads)  # batches x slots x candidates
    mean, spread = grads.mean(0), grads.std(0)
    decay = args.weight_decay * torch.stack([a.detach() for a in alphas]).abs()
    print(f'epoch {saved["epoch"]} of {args.checkpoint}, {args.batches} batches; per slot, mean over candidates:')
    print('slot  |mean grad|  spread    |alpha| x wd')
    for slot in range(grads.shape[1]):
        print(f'{slot:4d}  {mean[slot].abs().mean():.2e}    {spread[slot].mean():.2e}  {decay[slot].mean():.2e}')


if __name__ == '__main__':
    main()
