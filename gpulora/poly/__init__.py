"""The polynomial method: monomial tables, polynomial families, feature maps, Kronecker products, the chain."""
