"""The search picture (paper Fig. 1): softmax(alpha) of every slot over the search, and when each slot was fixed."""
import math
from typing import Dict, List, Sequence

__all__ = ['plot_search']


def plot_search(
        history: List[Dict],
        fix_events: Sequence[Dict],
        op_names: Sequence[str],
        num_slots: int,
        path: str,
        title: str = 'PMPL search',
) -> bool:
    """Write a PNG grid, one panel per slot: pi per candidate against epochs, a marker where the slot was fixed.

    `history` items are {'epoch': float, 'probabilities': [[pi per op] or None per slot]}. Returns False (and writes
    nothing) when matplotlib is not installed: the plot is optional, the genotype is not.
    """
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cols = min(4, num_slots)
    rows = math.ceil(num_slots / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), sharex=True, sharey=True, squeeze=False)
    colors = plt.get_cmap('tab10').colors
    events = {e['slot']: e for e in fix_events}
    for slot in range(num_slots):
        ax = axes[slot // cols][slot % cols]
        points = [(h['epoch'], h['probabilities'][slot]) for h in history if h['probabilities'][slot] is not None]
        for k, name in enumerate(op_names):
            ax.plot([p[0] for p in points], [p[1][k] for p in points], color=colors[k % len(colors)], label=name,
                    linewidth=1.2)
        event = events.get(slot)
        if event is not None:
            ax.axvline(event['epoch_float'], color='black', linestyle='--' if event['forced'] else '-', linewidth=0.8)
            ax.set_title(f"slot {slot}: {event['op_name']}" + (' (forced)' if event['forced'] else ''), fontsize=9)
        else:
            ax.set_title(f'slot {slot}: open', fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for extra in range(num_slots, rows * cols):
        axes[extra // cols][extra % cols].axis('off')
    for ax in axes[-1]:
        ax.set_xlabel('epoch')
    for row in axes:
        row[0].set_ylabel('softmax(alpha)')
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='upper center', ncol=len(op_names), fontsize=8, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(f'{title} (solid line: fixed by Eq. 4, dashed: forced at the end)', y=1.03, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)
    return True
