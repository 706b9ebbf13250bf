"""Expert clusterings for merging (methods.md 2, 6.4). Each returns one layer's partition: a list of clusters, each
a sorted list of expert ids, clusters ordered by their smallest member.

* :func:`router_logit_affinity`: UNCURL's ``S = (1 + cos) / 2`` of the router-logit columns, from the Gram
  ``G = sum_t z_t z_t^T`` (``S_ij = G_ij / sqrt(G_ii G_jj)`` before the map);
* :func:`spectral_clusters`: spectral clustering on a precomputed affinity (scikit-learn, k-means labels);
* :func:`average_linkage_clusters`: HC-SMoE's agglomerative average linkage on Euclidean distances (scikit-learn);
* :func:`dominant_expert_groups`: M-SMoE's grouping of every other expert with its most similar dominant expert;
* :func:`frequency_seeded_clusters`: the most used experts seed the clusters, every other expert joins the seed
  nearest to it (Euclidean, on the same representations as average linkage).

Super experts (``singletons``) are left out of the clustering and returned as clusters of their own.
scikit-learn is imported lazily (it is only needed by these merges).
"""

from __future__ import annotations

import torch

from moecompress.errors import RecipeError


def router_logit_affinity(gram: torch.Tensor) -> torch.Tensor:
    """``[E, E]`` affinity in ``[0, 1]`` from the router-logit Gram ``[E, E]``."""
    gram = gram.double()
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    cosine = (gram / norms[:, None] / norms[None, :]).clamp(-1.0, 1.0)
    return (1.0 + cosine) / 2.0


def _with_singletons(labels_of: dict[int, int], singletons: list[int]) -> list[list[int]]:
    clusters: dict[int, list[int]] = {}
    for expert, label in labels_of.items():
        clusters.setdefault(label, []).append(expert)
    partition = [sorted(members) for members in clusters.values()] + [[expert] for expert in singletons]
    return sorted(partition, key=lambda members: members[0])


def _split(num_experts: int, num_clusters: int, singletons: list[int]) -> tuple[list[int], int]:
    singletons = sorted(set(singletons))
    free = [e for e in range(num_experts) if e not in singletons]
    free_clusters = num_clusters - len(singletons)
    if free_clusters < 1 and free:
        raise RecipeError(f"cannot merge {num_experts} experts into {num_clusters}: {len(singletons)} super experts "
                          "stay on their own; raise num_experts_to_keep/keep_ratio")
    return free, free_clusters


def spectral_clusters(affinity: torch.Tensor, num_clusters: int, singletons: list[int] = (), seed: int = 0) -> list[list[int]]:
    """Spectral clustering of the experts on ``affinity`` ``[E, E]`` into ``num_clusters`` clusters."""
    from sklearn.cluster import SpectralClustering  # scikit-learn is heavy: imported by the merges that use it

    free, free_clusters = _split(affinity.shape[0], num_clusters, list(singletons))
    if free_clusters >= len(free):
        labels = list(range(len(free)))
    else:
        sub = affinity[free][:, free].double().numpy()
        labels = SpectralClustering(n_clusters=free_clusters, affinity="precomputed", assign_labels="kmeans",
                                    random_state=seed).fit_predict(sub).tolist()
    return _with_singletons(dict(zip(free, labels)), sorted(set(singletons)))


def average_linkage_clusters(representations: torch.Tensor, num_clusters: int, singletons: list[int] = ()) -> list[list[int]]:
    """Agglomerative average-linkage clustering of ``representations`` ``[E, d]`` (Euclidean)."""
    from sklearn.cluster import AgglomerativeClustering  # scikit-learn is heavy: imported by the merges that use it

    free, free_clusters = _split(representations.shape[0], num_clusters, list(singletons))
    if free_clusters >= len(free):
        labels = list(range(len(free)))
    else:
        labels = AgglomerativeClustering(n_clusters=free_clusters, linkage="average", metric="euclidean").fit_predict(
            representations[free].double().numpy()).tolist()
    return _with_singletons(dict(zip(free, labels)), sorted(set(singletons)))


def dominant_expert_groups(similarity: torch.Tensor, dominants: list[int], singletons: list[int] = ()) -> list[list[int]]:
    """Every expert that is neither dominant nor a singleton joins the dominant expert (not a singleton) with the
    highest ``similarity`` ``[E, E]`` (ties: lower id). Returns one cluster per dominant and per singleton."""
    singletons = sorted(set(singletons))
    receivers = [d for d in sorted(set(dominants)) if d not in singletons]
    groups = {d: [d] for d in receivers}
    for expert in range(similarity.shape[0]):
        if expert in groups or expert in singletons:
            continue
        if not receivers:
            raise RecipeError("every kept expert is a super expert, so no cluster can take the others; "
                              "raise num_experts_to_keep/keep_ratio")
        best = max(receivers, key=lambda d: (float(similarity[expert, d]), -d))
        groups[best].append(expert)
    return sorted([sorted(members) for members in groups.values()] + [[s] for s in singletons if s not in groups],
                  key=lambda members: members[0])


def frequency_seeded_clusters(representations: torch.Tensor, token_counts: torch.Tensor, num_clusters: int,
                              singletons: list[int] = ()) -> list[list[int]]:
    """``num_clusters`` clusters seeded by the most used experts: the ``num_clusters - len(singletons)`` experts
    with the most routed tokens (``token_counts [E]``; ties: lower id) among the non-singletons are the seeds, and
    every other expert joins the seed whose representation (``[E, d]``) is nearest. So an expert the router (almost)
    never picks is never a cluster of its own while a busy one is merged away."""
    free, free_clusters = _split(representations.shape[0], num_clusters, list(singletons))
    by_use = sorted(free, key=lambda e: (-float(token_counts[e]), e))
    distance = torch.cdist(representations.double(), representations.double())
    return dominant_expert_groups(-distance, by_use[:free_clusters], singletons)
