//! The stage graph: edges go from a stage to the stages that need it.

use std::collections::BTreeSet;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, EdgeRef, Reversed};
use petgraph::Direction;

use super::stage::Stage;

#[derive(Debug)]
pub struct Dag {
    /// Node weights are indices into `Pipeline::stages`.
    pub graph: DiGraph<usize, ()>,
}

impl Dag {
    /// Builds the graph, or returns a cycle as the stage names along it (first = last).
    pub fn build(stages: &[Stage]) -> Result<Dag, Vec<String>> {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..stages.len()).map(|i| graph.add_node(i)).collect();
        for (i, s) in stages.iter().enumerate() {
            for need in &s.needs {
                let j = stages
                    .iter()
                    .position(|t| &t.name == need)
                    .expect("needs are validated");
                graph.add_edge(nodes[j], nodes[i], ());
            }
        }
        if let Err(cycle) = petgraph::algo::toposort(&graph, None) {
            return Err(cycle_through(&graph, cycle.node_id())
                .into_iter()
                .map(|n| stages[graph[n]].name.clone())
                .collect());
        }
        Ok(Dag { graph })
    }

    /// Indices of the stages `i` needs directly, in file order.
    pub fn needs(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        let mut needs: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(i), Direction::Incoming)
            .map(|n| self.graph[n])
            .collect();
        needs.sort_unstable();
        needs.into_iter()
    }

    /// Indices of the stages that need `i`, directly or not.
    pub fn dependents(&self, i: usize) -> BTreeSet<usize> {
        let mut dfs = Dfs::new(&self.graph, NodeIndex::new(i));
        let mut out = BTreeSet::new();
        while let Some(n) = dfs.next(&self.graph) {
            out.insert(self.graph[n]);
        }
        out.remove(&i);
        out
    }

    /// `targets` and every stage they need, directly or not.
    pub fn with_ancestors(&self, targets: &[usize]) -> BTreeSet<usize> {
        let rev = Reversed(&self.graph);
        let mut out = BTreeSet::new();
        for &t in targets {
            let mut dfs = Dfs::new(rev, NodeIndex::new(t));
            while let Some(n) = dfs.next(rev) {
                out.insert(self.graph[n]);
            }
        }
        out
    }

    /// Stage indices in an order where every stage comes after those it needs, ties broken by
    /// file order so listings are stable.
    pub fn topo_order(&self) -> Vec<usize> {
        let n = self.graph.node_count();
        let mut waiting: Vec<usize> = (0..n).map(|i| self.needs(i).count()).collect();
        let mut ready: BTreeSet<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for d in self.graph.neighbors(NodeIndex::new(i)) {
                let d = self.graph[d];
                waiting[d] -= 1;
                if waiting[d] == 0 {
                    ready.insert(d);
                }
            }
        }
        order
    }

    /// Renders the graph as indented text, Mermaid or Graphviz dot.
    pub fn render(&self, stages: &[Stage], format: DagFormat) -> String {
        let edges: Vec<(&str, &str)> = self
            .graph
            .edge_references()
            .map(|e| {
                (
                    stages[self.graph[e.source()]].name.as_str(),
                    stages[self.graph[e.target()]].name.as_str(),
                )
            })
            .collect();
        let mut out = String::new();
        match format {
            DagFormat::Text => {
                for i in self.topo_order() {
                    let s = &stages[i];
                    out.push_str(&format!("{} ({})", s.name, s.kind.name()));
                    if !s.needs.is_empty() {
                        out.push_str(&format!(" <- {}", s.needs.join(", ")));
                    }
                    out.push('\n');
                }
            }
            DagFormat::Mermaid => {
                out.push_str("flowchart TD\n");
                for s in stages {
                    out.push_str(&format!("    {0}[\"{0} ({1})\"]\n", s.name, s.kind.name()));
                }
                for (a, b) in edges {
                    out.push_str(&format!("    {a} --> {b}\n"));
                }
            }
            DagFormat::Dot => {
                out.push_str("digraph pipeline {\n    rankdir=TB;\n");
                for s in stages {
                    out.push_str(&format!("    \"{0}\" [label=\"{0}\\n{1}\"];\n", s.name, s.kind.name()));
                }
                for (a, b) in edges {
                    out.push_str(&format!("    \"{a}\" -> \"{b}\";\n"));
                }
                out.push_str("}\n");
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DagFormat {
    Text,
    Mermaid,
    Dot,
}

/// A cycle through `start`, found by walking edges until a node repeats.
fn cycle_through(graph: &DiGraph<usize, ()>, start: NodeIndex) -> Vec<NodeIndex> {
    // Depth-first search for a path from `start` back to itself.
    let mut stack = vec![(start, vec![start])];
    let mut seen = BTreeSet::new();
    while let Some((n, path)) = stack.pop() {
        for next in graph.neighbors(n) {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(start);
                return cycle;
            }
            if seen.insert(next) {
                let mut p = path.clone();
                p.push(next);
                stack.push((next, p));
            }
        }
    }
    vec![start, start]
}
