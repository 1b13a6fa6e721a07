"""EdgeKit optimization: tensorflow-model-optimization behind one small API.

    from optimize import prune, cluster, qat, pqat, cqat, load_model
    prune("artifacts/cnn", "artifacts/cnn-pruned80", sparsity=0.8)

See `optimize.recipes` for every setting, and `optimize.api` for what is measured.
"""

from optimize.api import cluster, cqat, load_model, optimize_model, pqat, prune, qat, run
from optimize.recipes import ClusterRecipe, CQATRecipe, PQATRecipe, PruneRecipe, QATRecipe, Technique, recipe_from_dict

__all__ = ["ClusterRecipe", "CQATRecipe", "PQATRecipe", "PruneRecipe", "QATRecipe", "Technique", "cluster",
           "cqat", "load_model", "optimize_model", "pqat", "prune", "qat", "recipe_from_dict", "run"]
